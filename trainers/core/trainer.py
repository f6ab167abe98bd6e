"""The shared training loop: one rank's view of data-parallel training with exact evaluation and resume.

    trainer = Trainer(task, rt, run_dir)
    summary = trainer.fit()

The parts are built elsewhere (the task's model and data, ``optim``, ``amp``, ``parallel``) and owned
elsewhere (checkpoints by the ``Checkpointer``, the stop agreement by ``StopAgreement``, counting by
``meter``, what the user reads by ``announce``); this module is the loop that ties them together, read
top to bottom: fit, epoch, step, evaluate. Every method runs on every rank, and every collective is
reached by all ranks in the same order; only file writes and printing are rank-0-only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from launcher.config import fingerprint
from launcher.runtime import Runtime
from launcher.signals import Preempted, StopFlag
from trainers.core.amp import Amp
from trainers.core.announce import Outcome, RunRecord, announce, summarize
from trainers.core.auto import DeviceTraits, describe_choices, settle
from trainers.core.checkpoint import Checkpointer
from trainers.core.data import build_loaders, check_splits, chunk, micro_batch_size
from trainers.core.evaluation import EVAL_EPOCH, describe, evaluate
from trainers.core.meter import TrainingLog
from trainers.core.metrics import ranking_metric
from trainers.core.nonfinite import NonFinite, finite_tensors
from trainers.core.optim import ConfiguredHyperparameters
from trainers.core.parallel import broadcast_buffers, maybe_no_sync, spread, to_memory_format, unwrap
from trainers.core.pretrained import freeze, init_from
from trainers.core.rng import RankRng, seed_everything
from trainers.core.sinks import count, make_sink, truncate_metrics
from trainers.core.sharding import local, shard_plan
from trainers.core.state import Registry, TrainState, weights_and_optimizer
from trainers.core.stopping import StopAgreement
from trainers.core.summary import model_summary
from trainers.core.task import BatchInfo, Task

#: run.debug=true trains and evaluates this many batches per epoch.
DEBUG_BATCHES = 4


class Trainer:
    """Data-parallel training of a ``Task`` for one rank."""

    def __init__(self, task: Task, rt: Runtime, run_dir: Path, stop: StopFlag | None = None) -> None:
        self.task, self.rt, self.run_dir = task, rt, run_dir
        self.auto_chosen = settle(task, DeviceTraits.of(rt.device))  # task.cfg: this device's values
        cfg = self.cfg = task.cfg
        self.started = time.perf_counter()
        # Set-up steps that may fail on one rank alone end in an agreement (rt.agreed): every rank stops at once
        # with the failing rank's message, instead of waiting in a collective the failed rank never reaches.
        with rt.agreed("data"):
            self.sink = make_sink(rt.is_main, run_dir, cfg.run.progress, cfg.run.tensorboard)
            self.state = TrainState(seed=cfg.run.seed, global_batch_size=cfg.train.batch_size)
            micro_batch_size(cfg.train.batch_size, rt.world_size, cfg.train.grad_accum)  # raises if it does not divide
            self.train_set, self.eval_set = task.build_data(rt)
            check_splits(self.train_set, self.eval_set, cfg.train.batch_size)
            self.sampler, self.train_loader, self.eval_loader = build_loaders(
                cfg, rt.world_size, rt.rank, rt.device, self.train_set, self.eval_set, self.state.seed)
        with rt.agreed("model"):
            model, sharding = self._build_model(), shard_plan(cfg, rt.device)
        self.model = spread(model, rt.device, rt.world_size, sync_bn=cfg.model.sync_bn, sharding=sharding,  # collective
                            channels_last=bool(cfg.model.channels_last), compile=bool(cfg.model.compile))
        seed_everything(self.state.seed + rt.rank)  # per-rank streams from here on (dropout etc.)
        with rt.agreed("optimizer"):
            self.optimizer = task.build_optimizer(unwrap(self.model))
            self.scheduler = task.build_scheduler(self.optimizer, self.steps_per_epoch, self.total_steps)
            self.configured = ConfiguredHyperparameters(self.optimizer, self.scheduler)  # before a checkpoint's
            self.metrics = task.metrics()
            self.best_name, self.best_sign = ranking_metric(self.metrics, cfg.checkpoint.best_metric,
                                                            cfg.checkpoint.keep_best)
        self.amp = Amp(cfg.train.precision, rt.device)
        self.log = TrainingLog(rt, self.sink, cfg.train.batch_size)
        self.agreement = StopAgreement(rt, stop)
        self.nonfinite = NonFinite(cfg.train.nonfinite, cfg.train.nonfinite_skips, self.sink.print,
                                   lambda: self.checkpointer.last_good())
        # What every checkpoint holds: the built-in state and the task's own, and each rank's own state.
        registry = Registry({**weights_and_optimizer(self.model, self.optimizer, sharding is not None),
                             "scheduler": self.scheduler, "scaler": self.amp, "train_state": self.state,
                             **{f"task.{name}": obj for name, obj in task.state().items()}})
        rank_state = Registry({"rng": RankRng(rt.device, rt.rank, lambda: self.state.seed), "losses": self.log.losses})
        self.checkpointer = Checkpointer(cfg.checkpoint, rt, run_dir, registry, rank_state, cfg, self.sink.print,
                                         prepare=self._sync_buffers, check=self._unfinite, sharded=sharding is not None)

    # ----------------------------------------------------------------------------------- building
    def _build_model(self) -> nn.Module:
        """The task's model, the same on every rank, with model.init_from and model.freeze applied."""
        cfg = self.cfg.model
        seed_everything(self.state.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = self.task.build_model()
        if cfg.init_from:
            for line in init_from(model, cfg.init_from).lines():
                self.sink.print(line)
        if cfg.freeze:
            self.sink.print(f"model.freeze: {len(freeze(model, cfg.freeze))} parameter tensors frozen")
        return model

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
            with self.rt.agreed("resume"):
                self.resume()
            self._announce()
            already = self._finished()  # resumed a run that had finished: report it, rewrite nothing
            result: dict[str, Any] = {}
            # Signals become a flag only while the loop can act on it; during start-up (imports, process
            # group, data) stop_during_startup's handlers end the process at once with the requeue status.
            self.agreement.flag.install()
            self.sink.start(self.total_steps, self.state.global_step)
            while not self._finished():
                self.train_epoch(self.state.epoch)
                result = self._end_of_epoch()
            if already:
                result = self.evaluate()
            else:
                self.checkpointer.save(self.state.global_step, self._best_value(result), final=True)
            model = self.checkpointer.export_model(unwrap(self.model), replace=not already)
            self.sink.stop()
            self._report_end(result, model)
        finally:
            self.agreement.flag.restore()
            self.train_loader.close()  # its persistent workers, before the process group goes
            self.checkpointer.close()
            self.sink.close()
        return {**result, "global_step": self.state.global_step}

    def _done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def _finished(self) -> bool:
        return self._done() or self.state.epoch >= self.cfg.train.epochs

    def _end_of_epoch(self) -> dict[str, Any]:
        """Evaluate and checkpoint as configured once an epoch (or the step budget) is used up."""
        epoch = self.state.epoch
        self.nonfinite.check(self.rt.max_all([float(not self.log.losses.finite())], "epoch end")[0] == 0,
                             self.state.global_step)
        if self.state.step_in_epoch == self.steps_per_epoch:  # not when max_steps stopped mid-epoch
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        result: dict[str, Any] = {}
        if self._finished() or (epoch + 1) % self.cfg.eval.every_epochs == 0:
            result = self.evaluate()
            self.sink.print(f"epoch {epoch}  {describe(result)}  ({result['test_samples']} samples)")
            self.sink.metric({"kind": "eval", "epoch": epoch, "step": self.state.global_step, **result})
            self.task.after_evaluation(unwrap(self.model), result, self.state.global_step, last=self._finished())
        if not self._finished():  # the last checkpoint is the final one
            self.checkpointer.maybe_save(self.state.global_step, epochs_done=epoch + 1,
                                         metric=self._best_value(result))
        return result

    def train_epoch(self, epoch: int) -> None:
        """Optimizer steps from the current position to the end of ``epoch``."""
        self.sampler.seed = self.state.seed
        self.sampler.set_epoch(epoch, self.state.step_in_epoch)
        self.model.train()
        for batch, index in self.log.timed(self.train_loader.epoch(self.state.seed, epoch)):
            if self.state.step_in_epoch >= self.steps_per_epoch:  # run.debug: a handful of batches
                break
            with self.rt.phase("training step"):  # DDP's gradient all-reduce happens in here
                self.log.stepped(self.train_step(batch, index, epoch))
            step = self.state.advance()
            self.task.after_step(unwrap(self.model), step, self.total_steps)
            self.sink.advance(step, epoch)
            if step % self.cfg.run.log_every == 0:
                mean = self.log.line(step, epoch, self.total_steps, float(self.scheduler.get_last_lr()[0]))
                self.nonfinite.check(math.isfinite(mean), step, f"the mean training loss since the last log line is {mean}")
            self._after_step()
            if self._done():
                break
        self.log.end_epoch(epoch, self.state.global_step)

    def _after_step(self) -> None:
        """Step-boundary duties: what the ranks agree on (a stop signal, a non-finite loss, time since the last
        checkpoint) and periodic checkpoints."""
        step, facts = self.state.global_step, {}
        if self.agreement.due(step):
            facts = self.agreement.agree(step, nonfinite=float(not self.log.losses.finite()),
                                         idle_s=self.checkpointer.idle_s())
            self.nonfinite.check(facts["nonfinite"] == 0, step)
        # At the last step a stop is moot: the run finishes and writes its final checkpoint anyway.
        if facts.get("stop") and not self._done():
            self.checkpointer.save(step, wait=True)
            self.sink.print(f"Stop signal received: checkpoint written at step {step}; exiting. Run the same command "
                            "again to resume from it.")
            raise Preempted(step)
        # A save that falls on an epoch's last step waits for _end_of_epoch, so that the checkpoint comes
        # after that epoch's evaluation (a resume must not evaluate it twice).
        if self.state.step_in_epoch < self.steps_per_epoch:
            self.checkpointer.maybe_save(step, idle_s=facts.get("idle_s"))

    def train_step(self, batch: Any, index: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """One optimizer step on this rank's share of a global batch; returns the loss (detached), or None when
        train.nonfinite=skip dropped the step."""
        batch = self.prepare_batch(batch, BatchInfo(index, epoch, self.state.seed, train=True))
        accum, buffers = self.cfg.train.grad_accum, self.nonfinite.buffers_before(self.model)
        total = torch.zeros((), device=self.rt.device)
        for i, micro in enumerate(chunk(batch, accum)):
            # Gradients are all-reduced only on the last micro-step; the others accumulate locally.
            with maybe_no_sync(self.model, sync=i == accum - 1), self.amp.autocast():
                loss = self.task.loss(self.task.forward(self.model, micro), micro) / accum
            self.amp.backward(loss)
            total += loss.detach().float()
        stepped = self.nonfinite.optimizer_step(self.amp, self.optimizer, self.model.parameters(),
                                                self.cfg.train.grad_clip, self.state.global_step + 1, buffers)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a dropped step still uses up its batch and its place in the schedule
        return total if stepped else None

    def prepare_batch(self, batch: Any, info: BatchInfo) -> Any:
        """The task's device transform, then the memory format the model expects."""
        return to_memory_format(self.task.transform(batch, info), bool(self.cfg.model.channels_last))

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, Any]:
        """Every evaluation metric over the whole evaluation set, each sample counted exactly once."""
        self._sync_buffers()
        return evaluate(unwrap(self.model), self.eval_loader, self.task, self.metrics, self.rt, self.amp,
                        self.state.seed, prepare=lambda b: to_memory_format(b, bool(self.cfg.model.channels_last)),
                        max_batches=DEBUG_BATCHES if self.cfg.run.debug else None)

    def _best_value(self, result: dict[str, Any]) -> float | None:
        """The value ranking checkpoints, signed so that higher is better (a loss is negated)."""
        value = result.get(self.best_name)
        return self.best_sign * float(value) if isinstance(value, (int, float)) else None

    def _unfinite(self) -> str | None:
        """What is not finite in this rank's state (its unlogged losses, the weights), or None."""
        if not self.log.losses.finite():
            return "the training loss became NaN or infinite"
        state = [local(t) for t in (*self.model.parameters(), *self.model.buffers())]
        return None if finite_tensors(state) else "the weights (or BatchNorm statistics) became NaN or infinite"

    def _sync_buffers(self) -> None:
        with self.rt.phase("buffer sync"):  # rank 0's BatchNorm statistics, for evaluation and checkpoints
            broadcast_buffers(self.model)

    # ----------------------------------------------------------------------------------- resume and reports
    def resume(self) -> None:
        """Continue from a checkpoint as checkpoint.resume says (the Checkpointer does it)."""
        self.resumed_from = self.checkpointer.resume()
        if self.rt.is_main:  # records past the resumed step (or all, for a fresh start) are redone
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.global_step)
        if self.resumed_from is not None:
            notes = self.checkpointer.moved() + self.configured.reapplied()  # every rank: each has its own optimizer
            self.sink.print(f"Resumed from {self.resumed_from} at epoch {self.state.epoch}, step {self.state.global_step}"
                            f" ({count(self.state.step_in_epoch, 'step')} into the epoch).{notes}")

    def _announce(self) -> None:
        devices = self.rt.describe_devices()  # a collective: before the rank-0 branch
        if not self.rt.is_main:
            return
        announce(RunRecord(
            task=self.task.name, run_dir=self.run_dir, given=self.task.given, env=self.rt.env, backend=self.rt.backend,
            devices=devices, precision=self.amp.describe(),
            auto=describe_choices(self.auto_chosen, self.rt.device.type), step=self.state.global_step,
            epoch=self.state.epoch, resumed_from=self.resumed_from, task_rows=self.task.describe(),
            higher_is_better={f"test_{n}": m.higher_is_better for n, m in self.metrics.items()},
            model_summary=model_summary(unwrap(self.model), self._example_inputs()) if self.cfg.run.debug else None,
            setup_s=time.perf_counter() - self.started), self.sink)

    def _example_inputs(self) -> Any:
        """The model inputs of one training batch, prepared as in training (for the debug model summary)."""
        batch, index = next(iter(self.train_loader.epoch(self.state.seed, EVAL_EPOCH)))
        return self.task.inputs(self.prepare_batch(batch, BatchInfo(index, EVAL_EPOCH, self.state.seed, train=True)))

    def _report_end(self, result: dict[str, Any], model: Path) -> None:
        """The ``end`` record of metrics.jsonl (a later run of the same command sees that this one finished) and
        the final summary (rank 0)."""
        if not self.rt.is_main:
            return
        outcome = Outcome(result=result, step=self.state.global_step, seconds=time.perf_counter() - self.started,
                          steps_trained=self.log.trained.steps, samples_per_s=self.log.trained.rate,
                          best=self.checkpointer.best_entry(), best_name=self.best_name, best_sign=self.best_sign,
                          checkpoints=self.run_dir / "checkpoints", model=model)
        self.sink.metric({"kind": "end", "step": outcome.step, "epoch": self.state.epoch, "seconds": outcome.seconds,
                          "steps_trained": outcome.steps_trained, "samples_per_s": outcome.samples_per_s,
                          "fingerprint": fingerprint(self.task.given),
                          **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
        summarize(outcome, self.sink)
