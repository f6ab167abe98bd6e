"""What a task supplies to the shared trainer: a model and the two splits (a Protocol, not a base class)."""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn

from launcher.config import Config
from launcher.runtime import Runtime
from trainers.data import ArraySplit


class Task(Protocol):
    """An image-classification task: the trainer does everything else."""

    name: str
    mean: tuple[float, ...]  # per-channel mean in [0, 1], for normalisation on the device
    std: tuple[float, ...]

    def build_model(self, cfg: Config) -> nn.Module:
        """A fresh model (the trainer seeds the RNG first, so every rank builds the same one)."""
        ...

    def load_data(self, cfg: Config, rt: Runtime) -> tuple[ArraySplit, ArraySplit]:
        """(train, test) splits; called on every rank (collectives inside are allowed, on all ranks)."""
        ...
