"""CIFAR-10 image classification: ``python -m trainers.cifar [--config FILE] [key=value ...]``.

A short user of the task API: its own config keys, in-memory uint8 splits (real or synthetic), and
normalisation plus crop-and-flip augmentation as batched tensor ops on the device. Runs unchanged as
one process, under torchrun or accelerate launch, and under srun/submitit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.nn as nn

from launcher.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, redefault, setting
from launcher.runtime import Runtime
from trainers.cifar_data import (CIFAR10_MEAN, CIFAR10_STD, ArrayDataset, DatasetUnavailable, download_cifar10,
                                 load_cifar10, synthetic_cifar10)
from trainers.core import BatchInfo, Task, run_task
from trainers.core.data import Augment, Normalize
from trainers.models import build_model

#: The synthetic dataset is fixed (not tied to run.seed): changing the seed must not change the data.
SYNTHETIC_SEED = 1234


@dataclass(frozen=True)
class CifarData(DataConfig):
    root: str = setting("data", "folder that holds (or will receive) `cifar-10-batches-py`")
    synthetic: bool = setting(False, "use a generated, learnable CIFAR-shaped dataset instead of the real one")
    synthetic_fallback: bool = setting(False, "if the real dataset cannot be read or downloaded, use synthetic "
                                       "data (with a warning)")
    download: bool = setting(True, "download the real dataset (torchvision) when it is missing")
    synthetic_train_size: int = setting(50_000, "synthetic training samples", gt=0)
    synthetic_test_size: int = setting(10_000, "synthetic test samples", gt=0)


@dataclass(frozen=True)
class CifarModel(ModelConfig):
    name: str = setting("resnet18", "`resnet18` (32x32 variant: 3x3 stem, no max-pool) or `tiny` (a small CNN for "
                        "tests and demos)", choices=("resnet18", "tiny"))
    width: int = setting(64, "channels of the first stage (`tiny` only; `resnet18` keeps 64)", gt=0)


@dataclass(frozen=True)
class CifarTrain(TrainConfig):
    augment: bool = setting(True, "random crop (pad 4) and horizontal flip, as batched tensor ops on the device")


@dataclass(frozen=True)
class CifarOptim(OptimConfig):
    lr: float = redefault(OptimConfig, "lr", 0.2)


@dataclass(frozen=True)
class CifarConfig(Config):
    data: CifarData = field(default_factory=CifarData)
    model: CifarModel = field(default_factory=CifarModel)
    train: CifarTrain = field(default_factory=CifarTrain)
    optim: CifarOptim = field(default_factory=CifarOptim)


def _agree(rt: Runtime, step: str, action: Callable[[], None]) -> str | None:
    """Run ``action`` here, then share the outcome so every rank takes the same branch afterwards."""
    error: str | None = None
    try:
        action()
    except DatasetUnavailable as e:
        error = str(e)
    failures = [e for e in rt.gather_objects(error, step) if e]
    return failures[0] if failures else None


class CifarTask(Task[CifarConfig]):
    """CIFAR-10 with a 32x32 ResNet-18 (or the tiny CNN), real or synthetic data."""

    name = "cifar"
    config = CifarConfig

    def __init__(self, cfg: CifarConfig) -> None:
        super().__init__(cfg)
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.augment: Augment | None = None

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model.name, self.cfg.model.width)

    def build_data(self, rt: Runtime) -> tuple[ArrayDataset, ArrayDataset]:
        train, test = self._load(rt)
        if self.cfg.train.augment:
            self.augment = Augment(len(train))
        return train, test

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        images, labels = batch
        x = self.normalize(images)
        if info.train and self.augment is not None:
            x = self.augment(x, info.index, info.epoch, info.seed)
        return x, labels

    def _load(self, rt: Runtime) -> tuple[ArrayDataset, ArrayDataset]:
        data = self.cfg.data
        if data.synthetic:
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
            return splits[0], splits[1]
        if not data.synthetic_fallback:
            raise DatasetUnavailable(error)
        if rt.is_main:
            print(f"warning: {error}\nUsing synthetic CIFAR-shaped data instead (data.synthetic_fallback=true).",
                  file=sys.stderr)
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
