"""CIFAR-10 image classification: ``python -m trainers.cifar [--config FILE] [key=value ...]``.

Runs unchanged as one process, under torchrun or accelerate launch, and under srun/submitit.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch.nn as nn

from launcher.config import Config
from launcher.runtime import Runtime
from trainers.cifar_data import (CIFAR10_MEAN, CIFAR10_STD, ArrayDataset, DatasetUnavailable, download_cifar10,
                                 load_cifar10, synthetic_cifar10)
from trainers.entry import run_task
from trainers.models import build_model

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


class CifarTask:
    """CIFAR-10 with a 32x32 ResNet-18 (or the tiny CNN), real or synthetic data."""

    name = "cifar"
    mean = CIFAR10_MEAN
    std = CIFAR10_STD

    def build_model(self, cfg: Config) -> nn.Module:
        return build_model(cfg.model.name, cfg.model.width)

    def load_data(self, cfg: Config, rt: Runtime) -> tuple[ArrayDataset, ArrayDataset]:
        if cfg.data.synthetic:
            return self._synthetic(cfg)
        splits: list[ArrayDataset] = []

        def fetch() -> None:
            # One download per node (local rank 0); the others read the files after the agreement.
            if cfg.data.download and rt.env.local_rank == 0:
                download_cifar10(cfg.data.root)

        def read() -> None:
            splits.extend([load_cifar10(cfg.data.root, train=True), load_cifar10(cfg.data.root, train=False)])

        error = _agree(rt, "dataset download", fetch) or _agree(rt, "dataset loading", read)
        if error is None:
            return splits[0], splits[1]
        if not cfg.data.synthetic_fallback:
            raise DatasetUnavailable(error)
        if rt.is_main:
            print(f"warning: {error}\nUsing synthetic CIFAR-shaped data instead (data.synthetic_fallback=true).",
                  file=sys.stderr)
        return self._synthetic(cfg)

    @staticmethod
    def _synthetic(cfg: Config) -> tuple[ArrayDataset, ArrayDataset]:
        return (synthetic_cifar10(cfg.data.synthetic_train_size, SYNTHETIC_SEED, train=True),
                synthetic_cifar10(cfg.data.synthetic_test_size, SYNTHETIC_SEED, train=False))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trainers.cifar``; returns the exit code."""
    return run_task(CifarTask(), argv)


if __name__ == "__main__":
    sys.exit(main())
