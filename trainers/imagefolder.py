"""Image classification from a folder of images: ``python -m trainers.imagefolder data.root=DIR model.name=NAME``.

``data.root`` holds ``train/`` and ``val/``, each with one sub-folder per class (torchvision's
ImageFolder layout; any format PIL reads). The number of classes comes from the folders. Workers
decode and crop (random resized crop and flip for training; resize and centre crop for evaluation)
into uint8 tensors, seeded per sample so that resume is exact; normalisation runs on the device.

    torchrun --nproc_per_node=4 -m trainers.imagefolder data.root=/data/mydataset model.name=resnet50
"""

from __future__ import annotations

import sys

from trainers.core.cli import begin_main
from trainers.imagefolder_config import FolderConfig

if __name__ == "__main__":
    begin_main(FolderConfig, "python -m trainers.imagefolder", "imagefolder")  # --help, config errors: before torch

# The heavy imports come after the --help check on purpose.
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn
import torchvision.models
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from launcher.errors import DatasetUnavailable
from launcher.runtime import Runtime
from trainers.core import Accuracy, BatchInfo, MeanLoss, Metric, Task, run_task
from trainers.core.data import Normalize
from trainers.models import tiny_cnn

def _split(root: Path, name: str, transform: Any) -> Any:
    folder = root / name
    if not folder.is_dir():
        raise DatasetUnavailable(f"{folder} does not exist: data.root={root} must hold train/ and val/, each with "
                                 "one sub-folder of images per class (e.g. train/cat/1.jpg, val/cat/7.jpg).")
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as e:  # no class folders, or a class folder without images
        raise DatasetUnavailable(f"{folder} is not a usable image folder: {e}. Put each class's images in a "
                                 "sub-folder named after the class.") from e


class ImageFolderTask(Task[FolderConfig]):
    """Classification of the images under data.root/{train,val}/<class>/."""

    name = "imagefolder"
    config = FolderConfig

    def __init__(self, cfg: FolderConfig) -> None:
        super().__init__(cfg)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std)
        self.classes: list[str] = []
        self.source = ""

    def build_data(self, rt: Runtime) -> tuple[Any, Any]:
        data, root = self.cfg.data, Path(self.cfg.data.root)
        # Decoding and cropping run in the workers on PIL images; the result is uint8, normalised on the device.
        flip = [v2.RandomHorizontalFlip()] if data.hflip else []
        train_tf = v2.Compose([v2.RandomResizedCrop(data.image_size, scale=(min(data.crop_scale_min, 1.0), 1.0)),
                               *flip, v2.PILToTensor()])
        eval_tf = v2.Compose([v2.Resize(round(data.image_size * data.resize)), v2.CenterCrop(data.image_size),
                              v2.PILToTensor()])
        train, val = _split(root, "train", train_tf), _split(root, "val", eval_tf)
        if train.classes != val.classes:
            only = sorted(set(train.classes) ^ set(val.classes))
            raise DatasetUnavailable(f"train/ and val/ under {root} have different class folders (only in one: "
                                     f"{', '.join(only[:10])}); give both the same class sub-folders.")
        self.classes = train.classes
        self.source = f"{root}: {len(train):,} train / {len(val):,} val images, {len(self.classes)} classes"
        return train, val

    def describe(self) -> dict[str, str]:
        return {"data": self.source}

    def build_model(self) -> nn.Module:
        name, n = self.cfg.model.name, len(self.classes)
        if name == "tiny":
            return tiny_cnn(n, self.cfg.model.width)
        # ViTs fix their input size at construction; other builders adapt through global pooling.
        extra = {"image_size": self.cfg.data.image_size} if name.startswith("vit_") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=n, **extra)

    def metrics(self) -> dict[str, Metric]:
        top5 = {"top5": Accuracy(topk=5)} if len(self.classes) > 5 else {}
        return {"acc": Accuracy(), **top5, "loss": MeanLoss()}

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        images, labels = batch
        return self.normalize(images), labels


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trainers.imagefolder``; returns the exit code."""
    return run_task(ImageFolderTask, argv)


if __name__ == "__main__":
    sys.exit(main())
