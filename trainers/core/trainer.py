"""The shared training loop: one rank's view of data-parallel training with exact evaluation and resume.

    trainer = Trainer(task, rt, run_dir)
    summary = trainer.fit()

The parts are built by small builders elsewhere (the task's model and data, ``optim``, ``amp``,
``parallel``, ``state``); this module is the loop that ties them together, readable top to bottom.
Every method runs on every rank, and every collective is reached by all ranks in the same order;
only file writes and printing are rank-0-only (and hold no collective).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from launcher.config import ConfigError, to_dict
from launcher.runtime import Runtime, seed_everything
from launcher.signals import Preempted, StopFlag
from trainers.core.amp import Amp
from trainers.core.announce import announce, summarize
from trainers.core.auto import DeviceTraits, resolve_auto
from trainers.core.checkpoint import (BackgroundSaver, CheckpointManager, load_checkpoint, rng_state, set_rng_state,
                                      strip_prefixes)
from trainers.core.data import (DeviceLoader, EvalShard, HostLoader, ResumableDistributedSampler, chunk,
                                make_loader, per_rank_batch, tree_map)
from trainers.core.evaluation import describe, evaluate
from trainers.core.parallel import convert_sync_batchnorm, maybe_no_sync, unwrap, wrap_ddp
from trainers.core.pretrained import freeze, init_from
from trainers.core.sinks import make_sink, truncate_metrics
from trainers.core.state import ModelState, Registry, TrainState
from trainers.core.task import BatchInfo, Task


#: run.debug=true trains and evaluates this many batches per epoch.
DEBUG_BATCHES = 4
#: Ranks agree on a stop signal about this often (seconds of training): every step when steps are slow,
#: every k steps when they are fast, so that the agreement costs next to nothing at any speed.
STOP_CHECK_S = 0.2
STOP_CHECK_MAX_STEPS = 100


class Trainer:
    """Data-parallel training of a ``Task`` for one rank."""

    def __init__(self, task: Task, rt: Runtime, run_dir: Path, stop: StopFlag | None = None) -> None:
        self.task, self.rt, self.run_dir = task, rt, run_dir
        # task.cfg keeps the user's `auto`s (fingerprint, config.yaml); the trainer works with this device's values
        self.cfg, self.auto_chosen = resolve_auto(task.cfg, DeviceTraits.of(rt.device))
        cfg = self.cfg
        self.stop = stop or StopFlag()
        self.started = time.perf_counter()
        self.sink = make_sink(rt.is_main, run_dir, cfg.run.progress, cfg.run.tensorboard)
        self.state = TrainState(seed=cfg.run.seed, global_batch_size=cfg.train.batch_size)
        per_rank_batch(cfg.train.batch_size, rt.world_size, cfg.train.grad_accum)  # raises if it does not divide
        self.rank_batch = cfg.train.batch_size // rt.world_size  # split further into grad_accum micro-batches
        self.train_set, self.eval_set = task.build_data(rt)
        self._check_sizes()
        self.sampler = ResumableDistributedSampler(self.train_set, rt.world_size, rt.rank, self.state.seed,
                                                   self.rank_batch)
        self.train_loader = self._loader(self.train_set, self.sampler, self.rank_batch, train=True)
        self.eval_loader = self._loader(self.eval_set, EvalShard(len(self.eval_set), rt.world_size, rt.rank),
                                        max(1, cfg.eval.batch_size // rt.world_size), train=False)
        self.model = self._build_model()
        self.optimizer = task.build_optimizer(unwrap(self.model))
        self.scheduler = task.build_scheduler(self.optimizer, self.steps_per_epoch, self.total_steps)
        self.amp = Amp(cfg.train.precision, rt.device)
        self.metrics = task.metrics()
        self.best_name, self.best_sign = self._best_metric()
        self.ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                      log=self.sink.print)
        # checkpoint.async: rank 0 copies the state to host memory and a thread writes it
        self.writer = BackgroundSaver(self.ckpt) if cfg.checkpoint.async_ else None
        self.registry = self._registry()
        self.window = torch.zeros((), device=rt.device)  # this rank's loss sum since the last log line
        self.window_steps = 0
        self.timing = [0, 0.0]  # (steps, seconds) of training since the last log line
        self.trained = [0, 0.0]  # (steps, seconds) of training in this process, for the final summary
        # Steps between stop-signal agreements; set from the all-reduced step time at each log line, so
        # every rank has the same value and all ranks stop at the same step.
        self.stop_every = 1  # steps between stop agreements; set from the measured step time at each agreement
        self._checked = (time.perf_counter(), 0)  # (time, global step) of the last agreement
        self.resumed_from: Path | None = None
        self.config_record = to_dict(cfg)  # for every checkpoint: built once (OmegaConf takes ~10 ms per call)

    # ----------------------------------------------------------------------------------- building
    def _loader(self, dataset: Any, sampler: Any, batch: int, train: bool) -> DeviceLoader | HostLoader:
        data = self.cfg.data
        workers = 0 if self.cfg.run.debug else data.num_workers  # debug: breakpoints in the Dataset work
        return make_loader(data.loader, dataset, sampler, batch, train, self.rt.device, workers,
                           pin_memory=data.pin_memory, persistent_workers=data.persistent_workers and train,
                           prefetch_factor=data.prefetch_factor)

    def _check_sizes(self) -> None:
        if len(self.train_set) < self.cfg.train.batch_size:
            raise ConfigError(f"The training set has {len(self.train_set)} samples, fewer than one global batch "
                              f"(train.batch_size={self.cfg.train.batch_size}); lower train.batch_size.")
        if len(self.eval_set) == 0:
            raise ConfigError("The evaluation set is empty; give the task evaluation data.")

    def _build_model(self) -> nn.Module:
        cfg = self.cfg.model
        seed_everything(self.state.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = self.task.build_model()
        if cfg.init_from:
            for line in init_from(model, cfg.init_from).lines():
                self.sink.print(line)
        if cfg.freeze:
            self.sink.print(f"model.freeze: {len(freeze(model, cfg.freeze))} parameter tensors frozen")
        if cfg.sync_bn and self.rt.world_size > 1:
            model = convert_sync_batchnorm(model, self.rt.device)
        model = model.to(self.rt.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            # Inside DDP, so that no_sync and unwrap see DDP on the outside; evaluation runs the bare model.
            model = torch.compile(model)  # type: ignore[assignment]
        seed_everything(self.state.seed + self.rt.rank)  # per-rank streams from here on (dropout etc.)
        return wrap_ddp(model, self.rt.device, self.rt.world_size)

    def _best_metric(self) -> tuple[str, float]:
        """The metric that ranks checkpoints and its sign (+1: higher is better); checked before training."""
        ranking = {f"test_{n}": m.higher_is_better for n, m in self.metrics.items() if m.higher_is_better is not None}
        name = self.cfg.checkpoint.best_metric or next(iter(ranking), "")
        if name not in ranking and (self.cfg.checkpoint.keep_best or self.cfg.checkpoint.best_metric):
            raise ConfigError(f"checkpoint.best_metric={name or '(empty)'} is not one of this task's ranking metrics "
                              f"({', '.join(ranking) or 'none'}); set it to one of these, or checkpoint.keep_best=false.")
        return name, 1.0 if ranking.get(name, True) else -1.0

    def _registry(self) -> Registry:
        registry = Registry()
        builtin: list[tuple[str, Any]] = [("model", ModelState(self.model)), ("optimizer", self.optimizer),
                                          ("scheduler", self.scheduler), ("scaler", self.amp),
                                          ("train_state", self.state)]
        for name, obj in builtin:
            registry.register(name, obj)
        for name, obj in self.task.state().items():
            registry.register(f"task.{name}", obj)
        return registry

    @property
    def steps_per_epoch(self) -> int:
        steps = self.sampler.steps_per_epoch
        return min(steps, DEBUG_BATCHES) if self.cfg.run.debug else steps

    @property
    def total_steps(self) -> int:
        total = self.cfg.train.epochs * self.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal, raising ``Preempted``); returns the final metrics."""
        try:
            self.resume()
            announce(self)
            result: dict[str, Any] = {}
            # Signals become a flag only while the loop can act on it; during start-up (imports, process
            # group, data) stop_during_startup's handlers end the process at once with the requeue status.
            self.stop.install()
            self.sink.start(self.total_steps, self.state.global_step)
            while not self._finished():
                self.train_epoch(self.state.epoch)
                result = self._end_of_epoch()
            if not result:  # resumed from a finished run: report, log nothing new
                result = self.evaluate()
            self.save(final=True, metric=self._best_value(result))
            self._save_model()
            self.sink.stop()
            summarize(self, result)
        finally:
            self.stop.restore()
            self._finish_background_write()
            self.sink.close()
        return {**result, "global_step": self.state.global_step}

    def _finish_background_write(self) -> None:
        """A checkpoint still being written when the run ends (an error, an interrupt) is completed."""
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as e:  # noqa: BLE001 - the run is already ending; its own error matters more
                self.sink.print(f"checkpoint: the background write failed: {e}")

    def _done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def _finished(self) -> bool:
        return self._done() or self.state.epoch >= self.cfg.train.epochs

    def _end_of_epoch(self) -> dict[str, Any]:
        """Evaluate and checkpoint as configured once an epoch (or the step budget) is used up."""
        epoch = self.state.epoch
        if self.state.step_in_epoch == self.steps_per_epoch:  # not when max_steps stopped mid-epoch
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        last = self._finished()
        result: dict[str, Any] = {}
        if last or (epoch + 1) % self.cfg.eval.every_epochs == 0:
            result = self.evaluate()
            self.sink.print(f"epoch {epoch}  {describe(result)}  ({result['test_samples']} samples)")
            self.sink.metric({"kind": "eval", "epoch": epoch, "step": self.state.global_step, **result})
        every = self.cfg.checkpoint.every_epochs
        due = (every and (epoch + 1) % every == 0) or self._step_save_due()
        if due and not last:  # the last one is the final checkpoint
            self.save(metric=self._best_value(result))
        return result

    def train_epoch(self, epoch: int) -> None:
        """Optimizer steps from the current position to the end of ``epoch``."""
        self.sampler.seed = self.state.seed
        self.sampler.set_epoch(epoch, self.state.step_in_epoch)
        self.model.train()
        tick = start = fetched = time.perf_counter()
        timed = done = 0
        waiting = 0.0  # seconds blocked on the loader: the part of the epoch that data loading costs
        for batch, index in self.train_loader.epoch(self.state.seed, epoch):
            waiting += time.perf_counter() - fetched
            if self.state.step_in_epoch >= self.steps_per_epoch:  # run.debug: a handful of batches
                break
            with self.rt.phase("training step"):  # DDP's gradient all-reduce happens in here
                self.window += self.train_step(batch, index, epoch)
            self.window_steps += 1
            timed += 1
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            self.task.after_step(unwrap(self.model), self.state.global_step, self.total_steps)
            self.sink.advance(self.state.global_step, epoch)
            if self.state.global_step % self.cfg.run.log_every == 0:
                self._add_timing(timed, tick)
                self._log_train()
                tick, timed = time.perf_counter(), 0
            self._after_step()
            done += 1
            if self._done():
                break
            fetched = time.perf_counter()
        self._add_timing(timed, tick)
        self._log_epoch(epoch, done, time.perf_counter() - start, waiting)

    def _log_epoch(self, epoch: int, steps: int, seconds: float, waiting: float) -> None:
        """Throughput of the epoch (global samples/s) and the largest share of it any rank spent waiting
        for data (one small gather per epoch, on the control group)."""
        wait = max(self.rt.gather_objects(waiting / seconds if seconds > 0 else 0.0, "epoch timing"))
        rate = steps * self.cfg.train.batch_size / seconds if seconds > 0 else 0.0
        if steps:
            self.sink.print(f"epoch {epoch}  {rate:,.0f} samples/s  waiting for data {wait:.0%} of the time")
            self.sink.metric({"kind": "epoch", "epoch": epoch, "step": self.state.global_step,
                              "samples_per_s": rate, "data_wait": wait})

    def _add_timing(self, steps: int, since: float) -> None:
        seconds = time.perf_counter() - since
        self.timing = [self.timing[0] + steps, self.timing[1] + seconds]
        self.trained = [self.trained[0] + steps, self.trained[1] + seconds]

    def _after_step(self) -> None:
        """Step-boundary duties: periodic checkpoints and the agreed stop on a signal."""
        # At the last step a stop is moot: the run finishes and writes its final checkpoint anyway.
        due = self.state.global_step % self.stop_every == 0
        stop = due and self._agree_on_stop() and not self._done()
        # A periodic save that falls on an epoch's last step waits for _end_of_epoch, so that the
        # checkpoint comes after that epoch's evaluation (a resume must not evaluate it twice).
        mid_epoch = self.state.step_in_epoch < self.steps_per_epoch
        if stop or (mid_epoch and self._step_save_due()):
            self.save(wait=stop)
        if stop:
            self.sink.print(f"Stop signal received: checkpoint written at step {self.state.global_step}; exiting.")
            raise Preempted(self.state.global_step)

    def _agree_on_stop(self) -> bool:
        """True on every rank if any rank received a stop signal. The same all-reduce carries the slowest
        rank's time per step since the previous check, from which every rank derives the same interval to
        the next check (about STOP_CHECK_S of training): agreeing costs next to nothing at any step rate."""
        now, step = time.perf_counter(), self.state.global_step
        per_step = (now - self._checked[0]) / max(1, step - self._checked[1])
        flag, slowest = self.rt.max_all([float(self.stop.requested), per_step], "preemption check")
        self._checked = (now, step)
        self.stop_every = max(1, min(STOP_CHECK_MAX_STEPS, int(STOP_CHECK_S / slowest) if slowest > 0 else 1))
        return flag > 0

    def _step_save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.global_step % every == 0

    def train_step(self, batch: Any, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; returns the loss (detached)."""
        batch = self.prepare_batch(batch, BatchInfo(index, epoch, self.state.seed, train=True))
        accum = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.rt.device)
        for i, micro in enumerate(chunk(batch, accum)):
            # Gradients are all-reduced only on the last micro-step; the others accumulate locally.
            with maybe_no_sync(self.model, sync=i == accum - 1), self.amp.autocast():
                loss = self.task.loss(self.task.forward(self.model, micro), micro) / accum
            self.amp.backward(loss)
            total += loss.detach().float()
        self.amp.step(self.optimizer, self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total

    def prepare_batch(self, batch: Any, info: BatchInfo) -> Any:
        """The task's device transform, then the memory format the model expects."""
        return self._memory_format(self.task.transform(batch, info))

    def _memory_format(self, batch: Any) -> Any:
        if not self.cfg.model.channels_last:
            return batch
        return tree_map(lambda t: t.contiguous(memory_format=torch.channels_last)
                        if t.dim() == 4 and t.is_floating_point() else t, batch)

    def _log_train(self) -> None:
        """Log the mean training loss since the last log line (all ranks take part in the reduction)."""
        timed_steps, seconds = self.timing
        total = self.rt.all_reduce(self.window.reshape(1).clone(), "loss logging").item()
        steps = self.window_steps
        mean = total / self.rt.world_size / steps
        lr = self.scheduler.get_last_lr()[0]
        rate = timed_steps * self.cfg.train.batch_size / seconds if seconds > 0 else 0.0
        if not self.sink.live:  # the live display shows these instead
            self.sink.print(f"epoch {self.state.epoch}  step {self.state.global_step}/{self.total_steps}  "
                            f"loss {mean:.4f}  lr {lr:.4g}  {rate:,.0f} samples/s")
        self.sink.advance(self.state.global_step, self.state.epoch, loss=mean, lr=lr, rate=f"{rate:,.0f}")
        self.sink.metric({"kind": "train", "epoch": self.state.epoch, "step": self.state.global_step,
                          "loss": mean, "lr": lr, "samples_per_s": rate})
        self.window.zero_()
        self.window_steps = 0
        self.timing = [0, 0.0]

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, Any]:
        """Every evaluation metric over the whole evaluation set, each sample counted exactly once."""
        model = unwrap(self.model)
        self._sync_buffers(model)
        return evaluate(model, self.eval_loader, self.task, self.metrics, self.rt, self.amp, self.state.seed,
                        prepare=self._memory_format, max_batches=DEBUG_BATCHES if self.cfg.run.debug else None)

    def _best_value(self, result: dict[str, Any]) -> float | None:
        """The value ranking checkpoints, signed so that higher is better (a loss is negated)."""
        value = result.get(self.best_name)
        return self.best_sign * float(value) if isinstance(value, (int, float)) else None

    def _sync_buffers(self, model: nn.Module) -> None:
        # Plain BatchNorm running statistics drift apart across ranks after the last forward;
        # rank 0's are the ones checkpointed, so every rank evaluates with those.
        if self.rt.distributed:
            with self.rt.phase("buffer sync"):
                for buf in model.buffers():
                    torch.distributed.broadcast(buf, src=0)

    # ----------------------------------------------------------------------------------- checkpoints
    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams and the unlogged loss window."""
        return {"rng": rng_state(self.rt.device), "window": self.window.item(), "window_steps": self.window_steps}

    def save(self, final: bool = False, metric: float | None = None, wait: bool = False) -> None:
        """Checkpoint the current state (called on every rank; rank 0 writes).

        With checkpoint.async, a periodic checkpoint is written in the background; the final one and the
        stop checkpoint (``wait``) are on disk before this returns."""
        self._sync_buffers(unwrap(self.model))
        ranks = self.rt.gather_objects(self._rank_state(), "checkpoint")
        if self.rt.is_main:
            state = {**self.registry.state_dict(), "ranks": ranks, "world_size": self.rt.world_size,
                     "config": self.config_record}
            background = self.writer is not None and not (final or wait)
            if self.writer is not None and not background:
                self.writer.wait()
            path = (self.writer.save if background and self.writer else self.ckpt.save)(
                state, self.state.global_step, metric)
            self.sink.print(f"checkpoint {path.name}" + (" (final)" if final else " (writing in the background)"
                                                         if background else ""))
        self.rt.barrier("checkpoint")

    def _save_model(self) -> None:
        """The final weights alone, as ``model.pt`` (plain keys), for inference and fine-tuning."""
        if self.rt.is_main:
            torch.save(strip_prefixes(unwrap(self.model).state_dict()), self.run_dir / "model.pt")

    def resume(self) -> None:
        """Continue from a checkpoint as checkpoint.resume says: auto, never, or a path."""
        choice = self.cfg.checkpoint.resume
        found = None
        if choice == "never" and self.ckpt.list():
            raise ConfigError(
                f"checkpoint.resume=never but {self.ckpt.directory} already holds checkpoints, which a fresh run "
                "would overwrite and prune. Choose a new run.dir, or resume with checkpoint.resume=auto.")
        if choice == "auto":
            found = self.ckpt.load_latest(map_location="cpu")
        elif choice != "never":
            found = load_checkpoint(choice, map_location="cpu"), Path(choice)
        if found is not None:
            self._restore(found[0])
        if self.rt.is_main:  # records past the resumed step (or all, for a fresh start) are redone
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.global_step)
        if found is None:
            return
        self.resumed_from = found[1]
        self.sink.print(f"Resumed from {found[1]} at epoch {self.state.epoch}, step {self.state.global_step} "
                        f"({self.state.step_in_epoch} steps into the epoch).")

    def _restore(self, state: dict[str, Any]) -> None:
        if "sampler_seed" in state:  # written before the state registry: seed and batch size were top-level
            state["train_state"] = {**state["train_state"], "seed": state["sampler_seed"],
                                    "global_batch_size": state["global_batch_size"]}
        saved = state.get("train_state", {})
        if saved.get("step_in_epoch") and saved.get("global_batch_size") != self.cfg.train.batch_size:
            raise ConfigError(
                f"The checkpoint stopped mid-epoch with train.batch_size={saved.get('global_batch_size')}, but this "
                f"run has train.batch_size={self.cfg.train.batch_size}; an exact resume needs the same global batch. "
                "Set it back, or start fresh with checkpoint.resume=never in a new run.dir.")
        self.registry.load_state_dict(state)
        self.state.global_batch_size = self.cfg.train.batch_size
        self._restore_rank(state["ranks"])

    def _restore_rank(self, ranks: list[dict[str, Any]]) -> None:
        mine = ranks[self.rt.rank] if len(ranks) == self.rt.world_size else None
        if mine is None:
            # A different world size: fresh per-rank streams, and the loss window spread evenly so
            # that its rank mean is unchanged.
            seed_everything(self.state.seed + self.rt.rank)
            mine = {"window": sum(r["window"] for r in ranks) / len(ranks), "window_steps": ranks[0]["window_steps"]}
        else:
            set_rng_state(mine["rng"], self.rt.device)
        self.window.fill_(mine["window"])
        self.window_steps = mine["window_steps"]
