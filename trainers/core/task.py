"""What a task supplies to the shared trainer. Subclass ``Task`` and override what is yours.

A task object is built once per run from the resolved config (``self.cfg``: every ``auto`` already decided
for this device). Only ``build_model`` and ``build_data`` are required; everything else has a default that
fits classification:

    class MyTask(Task):
        name = "mytask"
        config = MyConfig                       # the typed config: Config plus the task's own keys

        def build_model(self) -> nn.Module: ...
        def build_data(self, rt) -> tuple[Dataset, Dataset]: ...    # (train, evaluation)

Overridable, with defaults:
    inputs / targets      which parts of a batch go into the model and into the loss
    forward               outputs of the model for a batch
    loss                  the mean loss of a (micro-)batch, from the outputs
    metrics               exact evaluation metrics (sums reduced once across ranks)
    transform             per-batch transforms on the device (normalisation, augmentation)
    build_optimizer / build_scheduler   from ``optim.*`` / ``sched.*``, or your own
    after_step            called after every optimizer step (weight averaging such as EMA or Lookahead)
    after_evaluation      called after each evaluation (e.g. sampling from a language model)
    describe              extra rows for the start-up table
    state                 extra objects to checkpoint (anything with state_dict/load_state_dict)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LRScheduler

from trainers.core.config import Config
from launcher.runtime import Runtime
from trainers.core.metrics import Accuracy, MeanLoss, Metric
from trainers.core.optim import build_optimizer, build_scheduler
from trainers.core.state import Stateful

__all__ = ["Task", "BatchInfo"]

C = TypeVar("C", bound=Config)

_INPUT_KEYS = ("inputs", "input", "images", "image", "x")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")


@dataclass(frozen=True)
class BatchInfo:
    """Context of a batch for device transforms: which samples, which epoch, which seed, which phase.

    Random transforms keyed by ``(seed, epoch, index)`` are the same after a resume and at any world size.
    """

    index: torch.Tensor  # dataset indices of the batch's samples, on the device
    epoch: int
    seed: int
    train: bool


def _pick(batch: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise KeyError(f"the default Task.{what}() looks for one of the keys {', '.join(keys)} in a dict sample, but "
                   f"the samples have {', '.join(map(str, batch))}; override {what}() in your task")


class Task(Generic[C]):
    """A training task: the model, data and loss are the user's; the trainer does everything else."""

    #: Short name: the default run directory is runs/<name>-..., and ``--help`` shows it.
    name: str = "task"
    #: The config schema (a subclass of ``launcher.config.Config`` adding the task's keys).
    config: type[Config] = Config

    #: The config as the user gave it, device-dependent ``auto`` values included (for config.yaml); set by
    #: ``run_task`` or the trainer. ``self.cfg`` holds what this device resolved them to.
    given: Config | None = None

    def __init__(self, cfg: C) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ required
    def build_model(self) -> nn.Module:
        """A fresh model (the trainer seeds the RNGs first, so every rank builds the same one)."""
        raise NotImplementedError

    def build_data(self, rt: Runtime) -> tuple[Any, Any]:
        """(train, evaluation) map-style Datasets, or TensorSplits for ``data.loader=device``.

        Called on every rank; collectives inside are allowed if every rank reaches them.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ batches and loss
    def inputs(self, batch: Any) -> Any:
        """What goes into the model: a tuple's first item, or a dict's ``inputs``/``image``/... entry."""
        return _pick(batch, _INPUT_KEYS, "inputs") if isinstance(batch, dict) else batch[0]

    def targets(self, batch: Any) -> Any:
        """What the loss and metrics compare against: a tuple's second item, or a dict's ``targets``/``label``/..."""
        return _pick(batch, _TARGET_KEYS, "targets") if isinstance(batch, dict) else batch[1]

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """The model's outputs for a batch (runs under autocast)."""
        return model(self.inputs(batch))

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """Mean training loss of a (micro-)batch; default: cross-entropy with ``train.label_smoothing``."""
        return F.cross_entropy(outputs, self.targets(batch), label_smoothing=self.cfg.train.label_smoothing)

    def metrics(self) -> dict[str, Metric]:
        """Evaluation metrics by name, reported as ``test_<name>``; the first one ranks checkpoints unless
        ``checkpoint.best_metric`` names another. Default: accuracy and mean cross-entropy."""
        return {"acc": Accuracy(), "loss": MeanLoss()}

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        """Per-batch transform on the device, for training (``info.train``) and evaluation; default: none."""
        return batch

    # ------------------------------------------------------------------ optimisation
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Default: ``optim.*`` over the trainable parameters, no decay on norm weights and biases."""
        return build_optimizer(self.cfg.optim, model)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                        total_steps: int) -> LRScheduler:
        """Default: ``sched.*`` (stepped after every optimizer step)."""
        return build_scheduler(self.cfg.sched, optimizer, steps_per_epoch, total_steps)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called on every rank after each optimizer step (``step`` counts from 1), with the unwrapped model:
        for weight averaging such as EMA or Lookahead. Keep its state in ``state()`` so that it resumes."""

    def after_evaluation(self, model: nn.Module, results: dict[str, Any], step: int, last: bool) -> None:
        """Called on every rank after each evaluation (``last``: the final one), with the bare model and the
        reduced results: for work that reads the trained model, such as sampling text. Rank-0-only work checks the
        rank itself; a collective here must be reached by every rank."""

    def describe(self) -> dict[str, str]:
        """Extra rows for the start-up table, e.g. ``{"data": "real CIFAR-10 at data/"}`` (after build_data)."""
        return {}

    # ------------------------------------------------------------------ extra checkpointed state
    def state(self) -> dict[str, Stateful]:
        """Objects saved in every checkpoint and restored on resume, by name (default: none)."""
        return {}
