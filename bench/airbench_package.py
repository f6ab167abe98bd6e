"""The published ``airbench`` package (Jordan 2024) run as published, on a GPU: the reference of the "against the
reference" row there. Its ``train94`` reads ``cifar10/train.pt`` and ``cifar10/test.pt`` from the working directory
(uint8 NHWC images, labels, class names) and runs its own ``.cuda().half()`` network; this module writes the same
images the toolkit trains on in that format, runs it in a temporary folder and evaluates with its own
test-time augmentation. CUDA only (the package is); ``make gpu-check`` installs it (``pip install airbench``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["train_and_evaluate"]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _write(folder: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": CLASSES},
               folder / name)


def train_and_evaluate(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, epochs: int = 10, batch: int = 1024) -> tuple[float, float]:
    """airbench94 as published on these images: (seconds from the whitening set-up to the last TTA prediction,
    test accuracy with its mirror+translate TTA)."""
    import airbench  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cifar10"
        data.mkdir()
        _write(data, "train.pt", train_images, train_labels)
        _write(data, "test.pt", test_images, test_labels)
        with _inside(Path(tmp)):
            loader: Any = airbench.CifarLoader("cifar10", train=True, batch_size=batch,
                                               aug={"flip": True, "translate": 2}, altflip=True)
            test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model = airbench.train94(train_loader=loader, epochs=epochs, verbose=False)
            accuracy = float(airbench.evaluate(model, test_loader, tta_level=2))
            torch.cuda.synchronize()
            return time.perf_counter() - start, accuracy
