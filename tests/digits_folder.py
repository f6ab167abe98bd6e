"""A small real-image folder for tests: scikit-learn's bundled handwritten digits written out as PNG files.

1,797 scans of handwritten digits (8x8, 17 grey levels) ship inside scikit-learn, so the image-folder
task is tested on real images, in torchvision's ImageFolder layout, with no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(root: Path, side: int = 32, val_every: int = 5) -> tuple[int, int]:
    """Write ``root/{train,val}/<digit>/<n>.png`` (every ``val_every``-th image to val/); returns the counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = [0, 0]
    scale = side // 8
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if n % val_every == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = (pixels * (255 / 16)).round().astype(np.uint8)
        big = np.kron(grey, np.ones((scale, scale), dtype=np.uint8))  # nearest-neighbour upscale to side x side
        Image.fromarray(big, mode="L").save(folder / f"{n}.png")
        counts[split == "val"] += 1
    return counts[0], counts[1]
