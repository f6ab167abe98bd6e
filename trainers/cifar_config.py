"""The CIFAR-10 task's configuration: the common sections plus its own keys (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.core.config import (Config, ConfigError, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig,
                                  redefault, setting)


def _positive_widths(value: tuple[int, ...]) -> str | None:
    return None if len(value) == 3 and all(w > 0 for w in value) else f"is {list(value)}; give three positive widths"


@dataclass(frozen=True)
class CifarData(DataConfig):
    root: str = setting("data", "folder that holds (or will receive) `cifar-10-batches-py`")
    synthetic: bool = setting(False, "use a generated, learnable CIFAR-shaped dataset instead of the real one")
    synthetic_fallback: bool = setting(False, "if the real dataset cannot be read or downloaded, use synthetic "
                                       "data (with a warning)")
    download: bool = setting(True, "download the real dataset (torchvision) when it is missing", changes_run=False)
    synthetic_train_size: int = setting(50_000, "synthetic training samples", gt=0)
    synthetic_test_size: int = setting(10_000, "synthetic test samples", gt=0, changes_run=False)


@dataclass(frozen=True)
class CifarModel(ModelConfig):
    name: str = setting("resnet18", "`resnet18` (32x32 variant: 3x3 stem, no max-pool), `airbench` (the fast recipe's "
                        "network, whitening set from the training images) or `tiny` (a small CNN for tests and demos)",
                        choices=("resnet18", "airbench", "tiny"))
    width: int = setting(64, "channels of the first stage (`tiny` only; the others keep their own)", gt=0)
    widths: tuple[int, int, int] = setting((64, 256, 256), "`airbench` only: channels of its three conv groups "
                                           "(the recipe's 64/256/256 are sized for a GPU; configs/cifar_fast_cpu.yaml "
                                           "has a CPU's)", check=_positive_widths)
    whiten_bias_epochs: float = setting(0.0, "`airbench` only: the whitening layer's bias learns for this many "
                                        "epochs, then stays fixed (the recipe: 3; 0: it learns throughout)", ge=0)


@dataclass(frozen=True)
class CifarTrain(TrainConfig):
    augment: bool = setting(True, "random crop (pad `pad`) and horizontal flip, as batched tensor ops on the device")
    pad: int = setting(4, "crop augmentation: padding in pixels (a random crop back to 32x32); 0: no crop", ge=0)
    pad_mode: str = setting("zeros", "padding of the crop: `zeros` or `reflect`", choices=("zeros", "reflect"))
    flip: str = setting("random", "`random` (each image, each epoch) or `alternate` (one random flip per image, "
                        "reversed every other epoch)", choices=("random", "alternate"))
    lookahead: bool = setting(False, "Lookahead weight averaging every 5 steps, its weight rising to 0.95^5 as "
                              "(step/total)^3; the final weights are the averaged ones")


@dataclass(frozen=True)
class CifarEval(EvalConfig):
    tta: str = setting("none", "test-time augmentation: `none`, `mirror` (average with the flipped image) or "
                       "`mirror_translate` (also 1-pixel shifts)", choices=("none", "mirror", "mirror_translate"),
                       changes_run=False)


@dataclass(frozen=True)
class CifarOptim(OptimConfig):
    lr: float = redefault(OptimConfig, "lr", 0.2)
    no_decay_lr_scale: float = setting(1.0, "learning rate of the parameters without weight decay (biases, norm "
                                       "layers) as a multiple of `lr`", gt=0)


@dataclass(frozen=True)
class CifarConfig(Config):
    data: CifarData = field(default_factory=CifarData)
    model: CifarModel = field(default_factory=CifarModel)
    train: CifarTrain = field(default_factory=CifarTrain)
    optim: CifarOptim = field(default_factory=CifarOptim)
    eval: CifarEval = field(default_factory=CifarEval)

    def check(self) -> None:
        if self.model.name != "tiny" and self.model.width != 64:
            raise ConfigError(f"model.width={self.model.width} applies to model.name=tiny only; {self.model.name} has its "
                              "own widths: leave model.width at 64 or choose model.name=tiny.")
        if self.model.widths != (64, 256, 256) and self.model.name != "airbench":
            raise ConfigError(f"model.widths={list(self.model.widths)} applies to model.name=airbench only; for "
                              f"{self.model.name} leave it at [64,256,256] (model.width sets the tiny CNN's).")
        if self.model.whiten_bias_epochs and self.model.name != "airbench":
            raise ConfigError(f"model.whiten_bias_epochs={self.model.whiten_bias_epochs:g} applies to model.name="
                              f"airbench only ({self.model.name} has no whitening layer); set it to 0.")
        if self.model.whiten_bias_epochs and self.sched.name == "onecycle":
            raise ConfigError("model.whiten_bias_epochs needs a schedule of its own per parameter group, which "
                              "sched.name=onecycle does not give; choose sched.name=triangle (the recipe's) or set "
                              "model.whiten_bias_epochs=0.")
