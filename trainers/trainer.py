"""The shared training loop: one rank's view of data-parallel training with exact evaluation and resume.

    trainer = Trainer(cfg, rt, task, run_dir)
    summary = trainer.fit()

Every method runs on every rank, and every collective is reached by all ranks in the same order;
only file writes and printing are rank-0-only (and hold no collective).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from launcher.config import Config, ConfigError, to_dict
from launcher.runtime import Runtime, seed_everything
from launcher.signals import Preempted, StopFlag
from trainers.amp import Amp
from trainers.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state, strip_prefixes
from trainers.data import (Augment, EvalShard, Normalize, ResidentSplit, ResumableDistributedSampler,
                           make_loader, per_rank_batch)
from trainers.parallel import convert_sync_batchnorm, maybe_no_sync, unwrap, wrap_ddp
from trainers.sinks import Sink, make_sink, truncate_metrics
from trainers.task import Task


@dataclass
class TrainState:
    """Where training stands; with the seed it fixes every sample still to come."""

    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # optimizer steps done inside ``epoch``
    global_step: int = 0  # optimizer steps done in total


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on BatchNorm and bias parameters (1-D): decaying them only hurts accuracy.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int):  # noqa: ANN201 - a LambdaLR factor
    """Linear warm-up to the peak, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Data-parallel classification training for one rank."""

    def __init__(self, cfg: Config, rt: Runtime, task: Task, run_dir: Path, stop: StopFlag | None = None) -> None:
        self.cfg, self.rt, self.task, self.run_dir = cfg, rt, task, run_dir
        self.stop = stop or StopFlag()
        self.sink: Sink = make_sink(rt.is_main, run_dir, cfg.run.progress)
        self.state = TrainState()
        # This rank's training-loss sum since the last logged step; checkpointed per rank so that a
        # resumed run logs bit-for-bit what the uninterrupted run logs.
        self.window = torch.zeros((), device=rt.device)
        self.window_steps = 0
        self.timing = [0, 0.0]  # steps and seconds of training (not evaluation) since the last log line
        per_rank_batch(cfg.train.batch_size, rt.world_size, cfg.train.grad_accum)  # raises if it does not divide
        self.rank_batch = cfg.train.batch_size // rt.world_size  # split further into grad_accum micro-batches
        self.seed = cfg.run.seed
        self.train_set, self.test_set = task.load_data(cfg, rt)
        self._check_sizes()
        if cfg.data.loader == "device":  # one copy per run, not one per epoch or evaluation
            self.train_set, self.test_set = (ResidentSplit(self.train_set, rt.device),
                                             ResidentSplit(self.test_set, rt.device))
        self.model = self._build_model()
        self.optimizer = torch.optim.SGD(_param_groups(self.model, cfg.train.weight_decay), lr=cfg.train.lr,
                                         momentum=cfg.train.momentum, nesterov=cfg.train.momentum > 0)
        self.amp = Amp(cfg.train.precision, rt.device)
        self.sampler = ResumableDistributedSampler(self.train_set, rt.world_size, rt.rank, self.seed,  # type: ignore[arg-type]
                                                   self.rank_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor())
        self.normalize = Normalize(task.mean, task.std, rt.device)
        self.augment = Augment(len(self.train_set), self.seed) if cfg.train.augment else None
        self.ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                      log=self.sink.print)

    # ----------------------------------------------------------------------------------- set-up
    def _check_sizes(self) -> None:
        if len(self.train_set) < self.cfg.train.batch_size:
            raise ConfigError(f"The training set has {len(self.train_set)} samples, fewer than one global batch "
                              f"(train.batch_size={self.cfg.train.batch_size}); lower train.batch_size.")

    def _build_model(self) -> nn.Module:
        seed_everything(self.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = self.task.build_model(self.cfg)
        if self.cfg.model.sync_bn and self.rt.world_size > 1:
            model = convert_sync_batchnorm(model, self.rt.device)
        model = model.to(self.rt.device)
        if self.cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        seed_everything(self.seed + self.rt.rank)  # per-rank streams from here on (dropout etc.)
        return wrap_ddp(model, self.rt.device, self.rt.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        total = self.cfg.train.epochs * self.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def _lr_factor(self):  # noqa: ANN202
        warmup = max(1, round(self.cfg.train.warmup_epochs * self.steps_per_epoch)) if self.cfg.train.warmup_epochs else 0
        return warmup_cosine(self.total_steps, min(warmup, self.total_steps))

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal, raising ``Preempted``); returns the final metrics."""
        self.resume()
        result: dict[str, Any] = {}
        # Signals become a flag only while the loop can act on it; during start-up (imports, process
        # group, data) they keep their default effect, so a launcher's SIGTERM ends the process at once.
        self.stop.install()
        try:
            while not self._finished():
                self.train_epoch(self.state.epoch)
                result = self._end_of_epoch()
            if not result:  # resumed from a finished run: report, log nothing new
                result = self.evaluate()
            self.save(final=True, metric=result["test_acc"])
            self._save_model()
        finally:
            self.stop.restore()
            self.sink.close()
        return {**result, "global_step": self.state.global_step}

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
            self.sink.print(f"epoch {epoch}  test_acc {result['test_acc']:.4f}  test_loss {result['test_loss']:.4f}"
                            f"  ({result['test_samples']} samples)")
            self.sink.metric({"kind": "eval", "epoch": epoch, "step": self.state.global_step, **result})
        every = self.cfg.checkpoint.every_epochs
        due = (every and (epoch + 1) % every == 0) or self._step_save_due()
        if due and not last:  # the last one is the final checkpoint
            self.save(metric=result.get("test_acc"))
        return result

    def train_epoch(self, epoch: int) -> None:
        """Optimizer steps from the current position to the end of ``epoch``."""
        self.sampler.set_epoch(epoch, self.state.step_in_epoch)
        loader = make_loader(self.cfg.data.loader, self.train_set, self.sampler, self.rank_batch, True,
                             self.rt.device, self.cfg.data.num_workers)
        self.model.train()
        self.sink.epoch_start(epoch, self.steps_per_epoch, self.state.step_in_epoch)
        tick = time.perf_counter()
        timed = 0
        for images, labels, index in loader:
            with self.rt.phase("training step"):  # DDP's gradient all-reduce happens in here
                self.window += self.train_step(images, labels, index, epoch)
            self.window_steps += 1
            timed += 1
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            self.sink.advance(self.state.step_in_epoch)
            if self.state.global_step % self.cfg.run.log_every == 0:
                self._add_timing(timed, tick)
                self._log_train()
                tick, timed = time.perf_counter(), 0
            self._after_step()
            if self._done():
                break
        self._add_timing(timed, tick)
        self.sink.epoch_end()

    def _add_timing(self, steps: int, since: float) -> None:
        self.timing = [self.timing[0] + steps, self.timing[1] + time.perf_counter() - since]

    def _after_step(self) -> None:
        """Step-boundary duties: periodic checkpoints and the agreed stop on a signal."""
        # At the last step a stop is moot: the run finishes and writes its final checkpoint anyway.
        stop = self.rt.any(self.stop.requested, "preemption check") and not self._done()
        # A periodic save that falls on an epoch's last step waits for _end_of_epoch, so that the
        # checkpoint comes after that epoch's evaluation (a resume must not evaluate it twice).
        mid_epoch = self.state.step_in_epoch < self.steps_per_epoch
        if stop or (mid_epoch and self._step_save_due()):
            self.save()
        if stop:
            self.sink.print(f"Stop signal received: checkpoint written at step {self.state.global_step}; exiting.")
            raise Preempted(self.state.global_step)

    def _step_save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.global_step % every == 0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; returns the loss (detached)."""
        x = self._prepare(images, index, epoch)
        accum = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.rt.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(accum), labels.chunk(accum))):
            # Gradients are all-reduced only on the last micro-step; the others accumulate locally.
            with maybe_no_sync(self.model, sync=i == accum - 1), self.amp.autocast():
                loss = F.cross_entropy(self.model(xm), ym, label_smoothing=self.cfg.train.label_smoothing) / accum
            self.amp.backward(loss)
            total += loss.detach().float()
        self.amp.step(self.optimizer, self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total

    def _prepare(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        x = self.normalize(images)
        if self.augment is not None:
            x = self.augment(x, index, epoch)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.model.channels_last else x

    def _log_train(self) -> None:
        """Log the mean training loss since the last log line (all ranks take part in the reduction)."""
        total = self.rt.all_reduce(self.window.reshape(1).clone(), "loss logging").item()
        steps = self.window_steps
        mean = total / self.rt.world_size / steps
        lr = self.scheduler.get_last_lr()[0]
        timed_steps, seconds = self.timing
        rate = timed_steps * self.cfg.train.batch_size / seconds if seconds > 0 else 0.0
        self.sink.print(f"epoch {self.state.epoch}  step {self.state.global_step}/{self.total_steps}  "
                        f"loss {mean:.4f}  lr {lr:.4g}  {rate:,.0f} samples/s")
        self.sink.metric({"kind": "train", "epoch": self.state.epoch, "step": self.state.global_step,
                          "loss": mean, "lr": lr, "samples_per_s": rate})
        self.window.zero_()
        self.window_steps = 0
        self.timing = [0, 0.0]

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss and accuracy over the whole test set, each sample counted exactly once."""
        model = unwrap(self.model)
        self._sync_buffers(model)
        model.eval()
        shard = EvalShard(len(self.test_set), self.rt.world_size, self.rt.rank)
        eval_batch = max(1, self.cfg.eval.batch_size // self.rt.world_size)
        loader = make_loader(self.cfg.data.loader, self.test_set, shard, eval_batch, False, self.rt.device,
                             self.cfg.data.num_workers)
        totals = torch.zeros(3, dtype=torch.float64, device=self.rt.device)  # loss sum, correct, count
        for images, labels, _ in loader:
            x = self.normalize(images)
            if self.cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.amp.autocast():
                logits = model(x)
            totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += labels.numel()
        self.rt.all_reduce(totals, "evaluation")  # once, after the loop: shards may differ in length
        model.train()
        loss, correct, count = totals.tolist()
        return {"test_loss": loss / count, "test_acc": correct / count, "test_samples": int(count)}

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

    def _checkpoint_state(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": strip_prefixes(unwrap(self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.amp.state_dict(),
            "train_state": asdict(self.state),
            "ranks": ranks,  # one entry per rank
            "sampler_seed": self.seed,
            "global_batch_size": self.cfg.train.batch_size,
            "world_size": self.rt.world_size,
            "config": to_dict(self.cfg),
        }

    def save(self, final: bool = False, metric: float | None = None) -> None:
        """Checkpoint the current state (called on every rank; rank 0 writes)."""
        self._sync_buffers(unwrap(self.model))
        ranks = self.rt.gather_objects(self._rank_state(), "checkpoint")
        if self.rt.is_main:
            path = self.ckpt.save(self._checkpoint_state(ranks), self.state.global_step, metric)
            self.sink.print(f"checkpoint {path.name}" + (" (final)" if final else ""))
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
        path = found[1]
        self.sink.print(f"Resumed from {path} at epoch {self.state.epoch}, step {self.state.global_step} "
                        f"({self.state.step_in_epoch} steps into the epoch).")

    def _restore(self, state: dict[str, Any]) -> None:
        saved = TrainState(**state["train_state"])
        if saved.step_in_epoch and state["global_batch_size"] != self.cfg.train.batch_size:
            raise ConfigError(
                f"The checkpoint stopped mid-epoch with train.batch_size={state['global_batch_size']}, but this run "
                f"has train.batch_size={self.cfg.train.batch_size}; an exact resume needs the same global batch. "
                "Set it back, or start fresh with checkpoint.resume=never in a new run.dir.")
        unwrap(self.model).load_state_dict(strip_prefixes(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.amp.load_state_dict(state["scaler"])
        self.state = saved
        self.seed = state["sampler_seed"]
        self.sampler.seed = self.seed  # the saved seed fixes the rest of the sample order and augmentation
        if self.augment is not None:
            self.augment.seed = self.seed
        self._restore_rank(state["ranks"])

    def _restore_rank(self, ranks: list[dict[str, Any]]) -> None:
        mine = ranks[self.rt.rank] if len(ranks) == self.rt.world_size else None
        if mine is None:
            # A different world size: fresh per-rank streams, and the loss window spread evenly so
            # that its rank mean is unchanged.
            seed_everything(self.seed + self.rt.rank)
            mine = {"window": sum(r["window"] for r in ranks) / len(ranks), "window_steps": ranks[0]["window_steps"]}
        else:
            set_rng_state(mine["rng"], self.rt.device)
        self.window.fill_(mine["window"])
        self.window_steps = mine["window_steps"]
