"""The CIFAR-10 task's configuration: the common sections plus its own keys (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, redefault, setting


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

    def check(self) -> None:
        if self.model.name == "resnet18" and self.model.width != 64:
            raise ConfigError(f"model.width={self.model.width} applies to model.name=tiny only; resnet18 has its "
                              "standard width: leave model.width at 64 or choose model.name=tiny.")
