"""The image-folder task's configuration: the common sections plus its own keys (light: torchvision is
imported only to check a model name)."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import lru_cache

from trainers.core.config import Config, DataConfig, ModelConfig, setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def classification_models() -> tuple[str, ...]:
    """Names of torchvision's classification model builders."""
    import torchvision.models  # here, not at the top: --help must not wait for torch

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _known_model(name: str) -> str | None:
    # Checked once torchvision is loaded (training imports it): the early check of the settings, before torch,
    # stays under a second.
    if name == "tiny" or "torchvision" not in sys.modules or name in classification_models():
        return None
    close = difflib.get_close_matches(name, classification_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"is not a torchvision classification model nor 'tiny'; {hint}"
            "torchvision.models.list_models() lists the names (resnet18, resnet50, mobilenet_v3_small, vit_b_16, ...)")


def _unit_means(value: tuple[float, ...]) -> str | None:
    return None if all(0 <= v <= 1 for v in value) else f"is {list(value)}; give per-channel means in [0, 1]"


def _positive_stds(value: tuple[float, ...]) -> str | None:
    return None if all(0 < v for v in value) else (f"is {list(value)}; give per-channel standard deviations above 0 "
                                                   "(a 0 divides by zero), e.g. [0.229,0.224,0.225]")


def _required(value: str) -> str | None:
    return None if value else "is required: the folder that holds train/ and val/ (one sub-folder per class)"


@dataclass(frozen=True)
class FolderData(DataConfig):
    root: str = setting("", "folder with `train/` and `val/`, each holding one sub-folder of images per class",
                        check=_required)
    image_size: int = setting(224, "side of the training crop and of the evaluation centre crop, in pixels", gt=0)
    resize: float = setting(1.143, "evaluation: resize the short side to `image_size` x this, then centre-crop",
                            ge=1, changes_run=False)
    crop_scale_min: float = setting(0.08, "smallest area fraction of the random resized crop (training)", gt=0)
    hflip: bool = setting(True, "random horizontal flip (training)")
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, "per-channel mean for normalisation, in [0, 1]",
                                               check=_unit_means)
    std: tuple[float, float, float] = setting(IMAGENET_STD, "per-channel std for normalisation, in (0, 1]",
                                              check=_positive_stds)


@dataclass(frozen=True)
class FolderModel(ModelConfig):
    name: str = setting("resnet18", "a torchvision classification model (`resnet50`, `mobilenet_v3_small`, "
                        "`vit_b_16`, ...) or `tiny`", check=_known_model)
    width: int = setting(32, "channels of the first stage (`tiny` only)", gt=0)


@dataclass(frozen=True)
class FolderConfig(Config):
    data: FolderData = field(default_factory=FolderData)
    model: FolderModel = field(default_factory=FolderModel)
