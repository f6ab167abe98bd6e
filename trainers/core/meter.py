"""Counting training as it goes: throughput (one formula for every place that reports it) and the
training-loss window between log lines (on the device, so that steps never wait for the host)."""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.runtime import Runtime

__all__ = ["Throughput", "LossWindow"]


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
