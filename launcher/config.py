"""Typed run configuration: a schema of dataclasses, YAML files, and ``key=value`` overrides.

Merging and type checking are OmegaConf's (structured configs); this module adds what it lacks:
errors that name the closest valid key, cross-field checks, and a frozen, plain-Python result.

    cfg = load_config("configs/cifar_debug.yaml", ["train.epochs=3", "data.synthetic=true"])
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Sequence, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


class Precision(str, Enum):
    """Numeric precision of the forward and backward passes."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; no loss scaling needed
    fp16 = "fp16"  # autocast to float16 with a GradScaler


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"  #: folder that holds (or will receive) ``cifar-10-batches-py``
    synthetic: bool = False  #: use a generated, learnable CIFAR-shaped dataset instead of the real one
    synthetic_fallback: bool = False  #: if the real dataset cannot be read or downloaded, use synthetic data
    download: bool = True  #: download the real dataset when it is missing
    synthetic_train_size: int = 50_000
    synthetic_test_size: int = 10_000
    loader: str = "dataloader"  #: "dataloader" (torch DataLoader) or "device" (whole split resident on the device)
    num_workers: int = 2  #: DataLoader worker processes per rank (dataloader loader only)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"  #: "resnet18" (CIFAR variant) or "tiny" (a small CNN for tests and demos)
    width: int = 64  #: channels of the first stage
    sync_bn: bool = False  #: BatchNorm statistics over the global batch instead of each rank's share
    channels_last: bool = False  #: NHWC memory format (faster convolutions on recent GPUs)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 512  #: global batch: samples per optimizer step summed over all ranks
    lr: float = 0.2  #: peak learning rate (SGD with Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0  #: linear warm-up, then cosine decay to zero
    precision: Precision = Precision.fp32
    grad_accum: int = 1  #: micro-steps per optimizer step; each rank's batch is split this many ways
    grad_clip: float = 0.0  #: max global gradient norm; 0 disables clipping
    max_steps: int = 0  #: stop after this many optimizer steps (0: run all epochs)
    augment: bool = True  #: random crop (pad 4) and horizontal flip


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1024  #: global evaluation batch
    every_epochs: int = 1  #: evaluate every N epochs (and always after the last)


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"  #: "auto" (nccl with CUDA, else gloo), "nccl" or "gloo"
    device: str = "auto"  #: "auto" (cuda:LOCAL_RANK if CUDA is available, else cpu), "cuda" or "cpu"
    timeout_s: float = 600.0  #: collective timeout: a rank that stops answering fails the job after this


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1  #: save at the end of every N epochs (0: never)
    every_steps: int = 0  #: also save every N optimizer steps (0: never)
    keep_last: int = 3  #: newest checkpoints kept on disk (the best one is kept in addition)
    keep_best: bool = True  #: keep the checkpoint with the best test accuracy
    resume: str = "auto"  #: "auto" (newest valid checkpoint in run.dir), "never", or a checkpoint path


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""  #: run directory; empty: runs/<name>-<job id or timestamp>
    name: str = "cifar"
    seed: int = 0
    deterministic: bool = False  #: deterministic kernels (slower; bit-exact resume on CPU)
    log_every: int = 50  #: optimizer steps between training-loss lines
    progress: str = "auto"  #: "auto" (a bar on a terminal, plain lines otherwise), "bar", "lines", "quiet"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Values that are free strings in the schema but drawn from a small set.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("dataloader", "device"),
    "model.name": ("resnet18", "tiny"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.device": ("auto", "cuda", "cpu"),
    "run.progress": ("auto", "bar", "lines", "quiet"),
}
_POSITIVE = ("train.epochs", "train.batch_size", "train.grad_accum", "eval.batch_size", "eval.every_epochs",
             "data.synthetic_train_size", "data.synthetic_test_size", "run.log_every", "checkpoint.keep_last")
_NON_NEGATIVE = ("train.lr", "train.weight_decay", "train.grad_clip", "train.max_steps", "train.warmup_epochs",
                 "data.num_workers", "dist.timeout_s", "checkpoint.every_epochs", "checkpoint.every_steps")


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``train.batch_size``."""
    keys: list[str] = []
    for name, hint in get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += schema_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest(key: str) -> str:
    """A hint naming the valid key closest to ``key`` (or the list of sections)."""
    keys = schema_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # a right leaf under a wrong section: "training.epochs" -> "train.epochs"
        leaf = key.rsplit(".", 1)[-1]
        match = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
        match = [k for k in keys if match and k.endswith("." + match[0])][:1]
    return f"did you mean '{match[0]}'?" if match else "valid sections: " + ", ".join(sorted({k.split('.')[0] for k in keys}))


def _check_keys(layer: Any, source: str) -> None:
    """Reject unknown keys by their full dotted name (OmegaConf reports only the first unknown level)."""
    known = set(schema_keys())
    for key, _ in flatten(OmegaConf.to_container(layer)):  # type: ignore[arg-type]
        if key not in known:
            raise ConfigError(f"Unknown configuration key '{key}' (from {source}): {_closest(key)} "
                              "Every key is listed in the README under 'Configuration'.")


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"Unknown configuration key '{key}' (from {source}): {_closest(key)} "
                           "Every key is listed in the README under 'Configuration'.")
    if isinstance(err, ValidationError):
        detail = str(err).splitlines()[0]
        return ConfigError(f"Invalid value for '{key}' (from {source}): {detail}. "
                           f"Give a value of the type of the default, e.g. {key}={_default_of(key)}.")
    return ConfigError(f"Invalid configuration (from {source}): {err}")


def _default_of(key: str) -> Any:
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part, None)
    if isinstance(node, bool):
        return str(node).lower()  # YAML spelling, as it would be typed on the command line
    return node.value if isinstance(node, Enum) else node


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override '{item}' is not of the form key=value; write for example train.epochs=3.")
    # Values are parsed as YAML scalars (true, 3, 1e-3, null), like the files.
    return OmegaConf.from_dotlist(list(overrides))


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass an existing file with --config "
                          "(the shipped ones are in configs/).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, train:, ...).")
    # A section whose keys are all commented out reads as None: treat it as empty, not as a bad key.
    data = {k: ({} if v is None else v) for k, v in data.items()}
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:  # e.g. a YAML date, which no key of the schema can hold
        raise _explain(e, str(path)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults, an optional YAML file and dotted overrides into a validated ``Config``."""
    merged = OmegaConf.structured(Config)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        layers.append((_load_file(Path(path)), str(path)))
    if overrides:
        layers.append((_parse_overrides(overrides), "the command line"))
    for layer, source in layers:
        _check_keys(layer, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)


def validate(cfg: Config) -> None:
    """Checks the schema's types cannot express: choices, ranges and cross-field rules."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"'{key}' is '{_get(cfg, key)}', which is not one of {', '.join(choices)}; "
                              f"set {key}={choices[0]} or another of these.")
    # Written as "not (x > 0)" so that NaN, which compares false with everything, is rejected too.
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"'{key}' must be positive, got {_get(cfg, key)}.")
    for key in _NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"'{key}' must not be negative, got {_get(cfg, key)}.")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume='{cfg.checkpoint.resume}' is neither 'auto', 'never' nor an existing "
                          "checkpoint file; give one of these.")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of builtins (enums as their values), for YAML, JSON and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some leaves changed, e.g. ``replace(cfg, run={"dir": "x"})``."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **vals)
                                       for name, vals in sections.items()})


def flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs of a nested dict, for one-line-per-key displays."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
