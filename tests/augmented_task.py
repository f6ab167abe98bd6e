"""A user's task written only against the public API (no edit to launcher/ or trainers/):
its own config keys, its own checkpointed object, and random torchvision transforms running in
DataLoader workers. ``python -m tests.augmented_task [key=value ...]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from trainers.core.config import Config, DataConfig, setting
from trainers.core import BatchInfo, Task, run_task


@dataclass(frozen=True)
class ShapesData(DataConfig):
    train_size: int = setting(384, "training images", gt=0)
    eval_size: int = setting(101, "evaluation images", gt=0)
    crop: int = setting(12, "side of the random resized crop", gt=0)


@dataclass(frozen=True)
class ShapesConfig(Config):
    data: ShapesData = field(default_factory=ShapesData)


class Shapes(Dataset):
    """16x16 uint8 images: a bright square whose position encodes the class (4 classes), plus noise."""

    def __init__(self, size: int, transform: Any) -> None:
        g = torch.Generator().manual_seed(size)
        self.labels = torch.arange(size) % 4
        self.images = torch.randint(0, 60, (size, 3, 16, 16), generator=g, dtype=torch.uint8)
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y, 2)
            self.images[i, :, r * 8:r * 8 + 8, c * 8:c * 8 + 8] += 150
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(self.images[i]), "label": int(self.labels[i])}


class MicroSteps:
    """The task's own checkpointed state: how many micro-batches it has trained on (resume must keep it)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class ShapesTask(Task[ShapesConfig]):
    name = "shapes"
    config = ShapesConfig

    def __init__(self, cfg: ShapesConfig) -> None:
        super().__init__(cfg)
        self.micro_steps = MicroSteps()

    def build_data(self, rt: Any) -> tuple[Dataset, Dataset]:
        crop = self.cfg.data.crop
        # Random in the workers: crop position and scale, flip, colour: seeded per sample by the toolkit.
        train = v2.Compose([v2.RandomResizedCrop(crop, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                            v2.ColorJitter(brightness=0.3)])
        return Shapes(self.cfg.data.train_size, train), Shapes(self.cfg.data.eval_size, v2.CenterCrop(crop))

    def build_model(self) -> nn.Module:  # no BatchNorm: DDP's result does not depend on the split
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(32, 4))

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        return {**batch, "image": batch["image"].float() / 255}

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        self.micro_steps.count += 1
        return super().loss(outputs, batch)

    def state(self) -> dict[str, Any]:
        return {"micro_steps": self.micro_steps}


if __name__ == "__main__":
    sys.exit(run_task(ShapesTask, prog="python -m tests.augmented_task"))
