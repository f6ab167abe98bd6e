"""CIFAR-10 image classification: ``python -m trainers.cifar [--config FILE] [key=value ...]``.

A short user of the task API: its own config keys, in-memory uint8 splits (real or synthetic), and
normalisation plus crop-and-flip augmentation as batched tensor ops on the device. Runs unchanged as
one process, under torchrun or accelerate launch, and under srun/submitit.
"""

from __future__ import annotations

import sys

from trainers.cifar_config import CifarConfig
from trainers.core.cli import begin_main

if __name__ == "__main__":
    begin_main(CifarConfig, "python -m trainers.cifar", "cifar")  # --help and config errors: before torch

# The heavy imports come after the --help check on purpose.
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from launcher.runtime import Runtime
from trainers.cifar_data import (CIFAR10_MEAN, CIFAR10_STD, ArrayDataset, DatasetUnavailable, download_cifar10,
                                 load_cifar10, synthetic_cifar10)
from trainers.core import BatchInfo, Task, run_task
from trainers.core.averaging import Lookahead
from trainers.core.data import Augment, Normalize
from trainers.core.optim import build_optimizer, lr_factor, separate_group
from trainers.core.state import Stateful
from trainers.models import build_model, init_whitening, whitening_layer

#: Training images (at most) whose 2x2 patches set the whitening layer of model.name=airbench.
WHITENING_IMAGES = 5000

#: The synthetic dataset is fixed (not tied to run.seed): changing the seed must not change the data.
SYNTHETIC_SEED = 1234


def _agree(rt: Runtime, step: str, action: Callable[[], None]) -> str | None:
    """Run ``action`` here, then share the outcome so every rank takes the same branch afterwards."""
    error: str | None = None
    try:
        action()
    except DatasetUnavailable as e:
        error = str(e)
    failures = [e for e in rt.gather_objects(error, step) if e]
    return failures[0] if failures else None


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Outputs averaged over test-time augmentations: ``none``, ``mirror`` (with the flipped image) or
    ``mirror_translate`` (also one-pixel shifts up-left and down-right, each with its mirror)."""
    if tta == "none":
        return model(x)
    mirrored = 0.5 * (model(x) + model(x.flip(-1)))
    if tta == "mirror":
        return mirrored
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
    return 0.5 * mirrored + 0.25 * sum(0.5 * (model(s) + model(s.flip(-1))) for s in shifted)


class CifarTask(Task[CifarConfig]):
    """CIFAR-10 with a 32x32 ResNet-18 (or the tiny CNN), real or synthetic data."""

    name = "cifar"
    config = CifarConfig

    def __init__(self, cfg: CifarConfig) -> None:
        super().__init__(cfg)
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.augment: Augment | None = None
        self.train_images: torch.Tensor | None = None
        self.lookahead = Lookahead() if cfg.train.lookahead else None
        self.source = ""  # which data this run trains on, for the start-up table

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.model.name, self.cfg.model.width, widths=self.cfg.model.widths)
        if self.cfg.model.name == "airbench" and self.train_images is not None:
            # The same images on every rank, so every rank computes the same filters.
            init_whitening(whitening_layer(model), self.normalize(self.train_images[:WHITENING_IMAGES]))
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer = build_optimizer(self.cfg.optim, model)
        decay, no_decay = optimizer.param_groups  # biases and norm layers are the second (core.optim)
        no_decay["lr"] *= self.cfg.optim.no_decay_lr_scale  # by position: with weight_decay=0 both groups have 0
        if self.cfg.model.name == "airbench":
            bias = whitening_layer(model).bias
            assert bias is not None  # whitening_layer checks that there is one
            # As in airbench94: trained like the weights (decayed, no bias scale), in a group of its own
            # so that model.whiten_bias_epochs can fix it (build_scheduler).
            separate_group(optimizer, bias, like=decay)
        return optimizer

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                        total_steps: int) -> LRScheduler:
        if not self.cfg.model.whiten_bias_epochs:
            return super().build_scheduler(optimizer, steps_per_epoch, total_steps)
        # A learning rate of 0 fixes the bias exactly (no gradient, momentum or decay moves it), while
        # requires_grad=False mid-run would leave DDP waiting for a gradient that never comes.
        shape = lr_factor(self.cfg.sched, steps_per_epoch, total_steps)
        fixed_from = round(self.cfg.model.whiten_bias_epochs * steps_per_epoch)
        factors = [shape] * len(optimizer.param_groups)
        factors[-1] = lambda step: shape(step) if step < fixed_from else 0.0
        return LambdaLR(optimizer, factors)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        x = self.inputs(batch)
        return model(x) if model.training else tta_logits(model, x, self.cfg.eval.tta)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        if self.lookahead is not None:
            self.lookahead.step(model, step, total_steps)

    def state(self) -> dict[str, Stateful]:
        return {"lookahead": self.lookahead} if self.lookahead is not None else {}

    def build_data(self, rt: Runtime) -> tuple[ArrayDataset, ArrayDataset]:
        train, test = self._load(rt)
        self.train_images = train.tensors[0]
        if self.cfg.train.augment:
            t = self.cfg.train
            self.augment = Augment(len(train), pad=t.pad, reflect=t.pad_mode == "reflect",
                                   alternate_flip=t.flip == "alternate")
        self.source += f": {len(train):,} train / {len(test):,} test images"
        return train, test

    def describe(self) -> dict[str, str]:
        return {"data": self.source}

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        images, labels = batch
        x = self.normalize(images)
        if info.train and self.augment is not None:
            x = self.augment(x, info.index, info.epoch, info.seed)
        return x, labels

    def _load(self, rt: Runtime) -> tuple[ArrayDataset, ArrayDataset]:
        data = self.cfg.data
        if data.synthetic:
            self.source = "synthetic (data.synthetic=true)"
            return self._synthetic()
        splits: list[ArrayDataset] = []

        def fetch() -> None:
            # One download per node (local rank 0); the others read the files after the agreement.
            if data.download and rt.env.local_rank == 0:
                download_cifar10(data.root)

        def read() -> None:
            splits.extend([load_cifar10(data.root, train=True), load_cifar10(data.root, train=False)])

        error = _agree(rt, "dataset download", fetch) or _agree(rt, "dataset loading", read)
        if error is None:
            self.source = f"real CIFAR-10 from {data.root}"
            return splits[0], splits[1]
        if not data.synthetic_fallback:
            raise DatasetUnavailable(error, same_on_every_rank=True)  # the ranks agreed on it
        if rt.is_main:
            print(f"warning: {error}\nUsing synthetic CIFAR-shaped data instead (data.synthetic_fallback=true).",
                  file=sys.stderr)
        self.source = "synthetic (fallback: the real dataset is not available)"
        return self._synthetic()

    def _synthetic(self) -> tuple[ArrayDataset, ArrayDataset]:
        data = self.cfg.data
        return (synthetic_cifar10(data.synthetic_train_size, SYNTHETIC_SEED, train=True),
                synthetic_cifar10(data.synthetic_test_size, SYNTHETIC_SEED, train=False))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trainers.cifar``; returns the exit code."""
    return run_task(CifarTask, argv)


if __name__ == "__main__":
    sys.exit(main())
