"""Counting training as it goes: throughput (one formula for every place that reports it) and the
training-loss window between log lines (on the device, so that steps never wait for the host)."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Iterator, TypeVar

import torch

from launcher.runtime import Runtime
from trainers.core.sinks import Sink

__all__ = ["Throughput", "LossWindow", "TrainingLog"]

T = TypeVar("T")


class Throughput:
    """Optimizer steps and the seconds they took; samples per second at a fixed global batch."""

    def __init__(self, global_batch_size: int, steps: int = 0, seconds: float = 0.0) -> None:
        self.global_batch_size = global_batch_size
        self.steps, self.seconds = steps, seconds

    def add(self, steps: int, seconds: float) -> None:
        self.steps += steps
        self.seconds += seconds

    def reset(self) -> None:
        self.steps, self.seconds = 0, 0.0

    @property
    def rate(self) -> float:
        """Global samples per second (0 before anything was timed)."""
        return self.steps * self.global_batch_size / self.seconds if self.seconds > 0 else 0.0


class LossWindow:
    """This rank's sum of training losses since the last log line, kept on the device.

    Checkpointed per rank (``state_dict``), so that a resumed run logs the same means as an uninterrupted
    one. Reading it (``mean``, ``finite``) synchronises with the device: only at log lines and agreements.
    """

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros((), device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def mean(self, rt: Runtime) -> float:
        """The mean loss per step and rank since the last reset (a collective: every rank calls it)."""
        total = rt.all_reduce(self.sum.reshape(1).clone(), "loss logging").item()
        return total / rt.world_size / max(1, self.steps)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sum).item())

    def reset(self) -> None:
        self.sum.zero_()
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.sum.item(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sum.fill_(state["sum"])
        self.steps = state["steps"]

    def load_other_world(self, states: list[dict[str, Any]]) -> None:
        """Saved at another world size: the windows spread evenly, so that their rank mean is unchanged."""
        self.load_state_dict({"sum": math.fsum(s["sum"] for s in states) / len(states), "steps": states[0]["steps"]})


class TrainingLog:
    """What training reports as it goes: a loss line every ``run.log_every`` steps (the mean over the steps since
    the previous line and over ranks) and a throughput line per epoch (with the largest share of the epoch any
    rank spent waiting for data). Every rank counts and takes part in the reductions; the sink writes (rank 0)."""

    def __init__(self, rt: Runtime, sink: Sink, global_batch_size: int) -> None:
        self.rt, self.sink = rt, sink
        self.losses = LossWindow(rt.device)  # this rank's losses since the last line (checkpointed per rank)
        self.since_line = Throughput(global_batch_size)
        self.trained = Throughput(global_batch_size)  # everything this process trained (the final summary)
        self.epoch = Throughput(global_batch_size)
        self._tick, self._timed, self._waiting = time.perf_counter(), 0, 0.0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, counting the time spent waiting for each one (the part of an epoch data loading costs)."""
        self.epoch.reset()
        self._tick, self._timed, self._waiting = time.perf_counter(), 0, 0.0
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._waiting += time.perf_counter() - asked
            yield item

    def stepped(self, loss: torch.Tensor | None) -> None:
        """One optimizer step done (``loss`` None: the step was dropped and is not part of the mean)."""
        if loss is not None:
            self.losses.add(loss)
        self._timed += 1

    def _add_timing(self) -> None:
        now = time.perf_counter()
        for meter in (self.since_line, self.trained, self.epoch):
            meter.add(self._timed, now - self._tick)
        self._tick, self._timed = now, 0

    def line(self, step: int, epoch: int, total_steps: int, lr: float) -> float:
        """The loss line at ``step`` (a collective); returns the mean loss it reports."""
        self._add_timing()
        mean, rate = self.losses.mean(self.rt), self.since_line.rate
        if not self.sink.live:  # the live display shows these instead
            self.sink.print(f"epoch {epoch}  step {step}/{total_steps}  loss {mean:.4f}  lr {lr:.4g}  "
                            f"{rate:,.0f} samples/s")
        self.sink.advance(step, epoch, loss=mean, lr=lr, rate=f"{rate:,.0f}")
        self.sink.metric({"kind": "train", "epoch": epoch, "step": step, "loss": mean, "lr": lr, "samples_per_s": rate})
        self.losses.reset()
        self.since_line.reset()
        return mean

    def end_epoch(self, epoch: int, step: int) -> None:
        """The epoch's throughput line (one small gather, on the control group)."""
        self._add_timing()
        seconds = self.epoch.seconds
        wait = max(self.rt.gather_objects(self._waiting / seconds if seconds > 0 else 0.0, "epoch timing"))
        if self.epoch.steps:
            self.sink.print(f"epoch {epoch}  {self.epoch.rate:,.0f} samples/s  waiting for data {wait:.0%} of the time")
            self.sink.metric({"kind": "epoch", "epoch": epoch, "step": step, "samples_per_s": self.epoch.rate,
                              "data_wait": wait})
