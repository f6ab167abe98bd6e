"""Typed run configuration: a schema of dataclasses, YAML files, and ``key=value`` overrides.

The common base (``Config``) holds what every task shares: data loading, model wrapping, training,
optimizer, schedule, evaluation, distribution, checkpoints and the run itself. A task extends it by
subclassing sections and the root (``class MyData(DataConfig): root: str = setting(...)``), so it
adds keys without touching this module. Each leaf is declared with ``setting()``: its default, one
line of documentation and its validation (choices, ranges, a custom check) sit beside the field.

    cfg = load_config("configs/my_task.yaml", ["train.epochs=3"], schema=MyTaskConfig)

Merging and type checking are OmegaConf's (structured configs); this module adds what it lacks:
errors that name the closest valid key, renamed-key messages, per-field validation, and a frozen,
plain-Python result.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import keyword
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from launcher.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""

    same_on_every_rank = True


def setting(default: Any, doc: str, *, choices: Sequence[Any] | None = None, gt: float | None = None,
            ge: float | None = None, check: Callable[[Any], str | None] | None = None,
            changes_run: bool = True) -> Any:
    """A config leaf: default, one line of documentation, and its validation beside it.

    ``choices``: allowed values; ``gt`` / ``ge``: lower bounds (NaN is always rejected);
    ``check``: a function returning an error message for a bad value, or None;
    ``changes_run=False``: the key does not change what is trained (workers, logging, where files
    go), so it is left out of the run's fingerprint and changing it resumes the same run.
    """
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "gt": gt, "ge": ge, "check": check,
            "changes_run": changes_run}
    return field(default=default, metadata=meta)


def redefault(section: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``section`` with a new default, keeping its documentation and validation.

        class MyOptim(OptimConfig):
            name: str = redefault(OptimConfig, "name", "adamw")
    """
    inherited = {f.name: f for f in dataclasses.fields(section)}[name]
    return field(default=default, metadata=inherited.metadata)


class Precision(str, Enum):
    """Numeric precision of the forward and backward passes."""

    auto = "auto"  # bf16 (fp16 where the GPU lacks bf16) on CUDA, fp32 on the CPU
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; no loss scaling needed
    fp16 = "fp16"  # autocast to float16 with a GradScaler


def _existing_checkpoint(value: str) -> str | None:
    if value in ("auto", "never") or Path(value).exists():
        return None
    return "is neither 'auto', 'never' nor an existing checkpoint file; give one of these"


def _bool_or_auto(value: bool | str) -> str | None:
    return None if isinstance(value, bool) or value == "auto" else f"is '{value}'; give true, false or auto"


def _existing_file_or_empty(value: str) -> str | None:
    return None if not value or Path(value).is_file() else "is not an existing file; give the path of a model.pt, " \
        "a checkpoint or a state_dict file (or leave it empty)"


@dataclass(frozen=True)
class DataConfig:
    """How batches are loaded; a task adds where its data lives."""

    loader: str = setting("dataloader", "`dataloader` (torch DataLoader, any Dataset) or `device` (in-memory "
                          "tensor splits resident on the device; same batches)", choices=("dataloader", "device"), changes_run=False)
    num_workers: int = setting(2, "DataLoader worker processes per rank (0: load in the main process)", ge=0, changes_run=False)
    pin_memory: bool = setting(True, "page-locked host batches for faster copies to a GPU (ignored on CPU)", changes_run=False)
    persistent_workers: bool = setting(True, "keep DataLoader workers alive between epochs", changes_run=False)
    prefetch_factor: int = setting(2, "batches each worker loads ahead", gt=0, changes_run=False)


@dataclass(frozen=True)
class ModelConfig:
    """How the task's model is prepared; a task adds which model to build."""

    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch (torch SyncBatchNorm on GPUs, a "
                            "gloo implementation on CPU)")
    channels_last: bool | str = setting("auto", "NHWC memory format for the model and 4-D inputs: `auto` (on with "
                                        "CUDA, and on a CPU whose convolutions run in oneDNN: faster on both), "
                                        "`true` or `false`", check=_bool_or_auto)
    compile: bool | str = setting("auto", "torch.compile the training model: `auto` (on with CUDA and Triton "
                                  "unless run.debug; off on the CPU, where compiling costs more than it saves), "
                                  "`true` or `false`", check=_bool_or_auto)
    init_from: str = setting("", "start from these weights: a `model.pt`, a checkpoint of this toolkit or a plain "
                             "state_dict; matching keys load, the rest is reported", check=_existing_file_or_empty)
    freeze: str = setting("", "comma-separated parameter name prefixes to freeze, e.g. `conv1,layer1`")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(30, "epochs", gt=0)
    batch_size: int = setting(512, "**global** batch: samples per optimizer step over all ranks; each rank gets "
                              "`batch_size / world_size`", gt=0)
    precision: Precision = setting(Precision.auto, "`auto` (bf16 on CUDA, fp16 on GPUs without bf16, fp32 on the "
                                   "CPU: exact and resumable bit for bit), `fp32`, `bf16` (autocast, no scaler; on "
                                   "a CPU with native bf16 about 2x faster) or `fp16` (autocast + GradScaler)")
    grad_accum: int = setting(1, "micro-steps per optimizer step; DDP syncs gradients only on the last", gt=0)
    grad_clip: float = setting(0.0, "max global gradient norm (unscaled first under fp16); 0 disables", ge=0)
    max_steps: int = setting(0, "stop after this many optimizer steps (0: all epochs)", ge=0)
    label_smoothing: float = setting(0.0, "label smoothing of the default cross-entropy loss", ge=0)


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("sgd", "`sgd` (momentum, Nesterov), `adamw` or `adam`", choices=("sgd", "adamw", "adam"))
    lr: float = setting(0.1, "peak learning rate", ge=0)
    momentum: float = setting(0.9, "SGD momentum", ge=0)
    nesterov: bool = setting(True, "Nesterov momentum (SGD)")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam/AdamW betas, e.g. `[0.9,0.95]`")
    eps: float = setting(1e-8, "Adam/AdamW epsilon", gt=0)
    weight_decay: float = setting(5e-4, "weight decay; never applied to norm-layer weights and biases", ge=0)


@dataclass(frozen=True)
class SchedConfig:
    name: str = setting("cosine", "`cosine` (to `final_lr`), `onecycle` (torch OneCycleLR), `step` (x`gamma` every "
                        "`step_epochs`), `triangle` (linear from `initial_lr` up to the peak at `warmup_epochs`, "
                        "linear down to `final_lr`) or `constant`",
                        choices=("cosine", "onecycle", "step", "triangle", "constant"))
    initial_lr: float = setting(0.0, "`triangle`: learning rate at the first step, as a fraction of the peak", ge=0)
    warmup_epochs: float = setting(1.0, "linear warm-up from ~0 to the peak (for `onecycle`: its rising phase)", ge=0)
    final_lr: float = setting(0.0, "`cosine`: learning rate at the end, as a fraction of the peak", ge=0)
    step_epochs: float = setting(30.0, "`step`: epochs between decays", gt=0)
    gamma: float = setting(0.1, "`step`: decay factor", gt=0)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = setting(1024, "global evaluation batch", gt=0, changes_run=False)
    every_epochs: int = setting(1, "evaluate every N epochs (and always after the last)", gt=0)


@dataclass(frozen=True)
class DistConfig:
    backend: str = setting("auto", "`auto` (nccl with CUDA, else gloo), `nccl` or `gloo`",
                           choices=("auto", "nccl", "gloo"), changes_run=False)
    device: str = setting("auto", "`auto` (cuda:LOCAL_RANK when CUDA is available, else cpu), `cuda` or `cpu`",
                          choices=("auto", "cuda", "cpu"), changes_run=False)
    timeout_s: float = setting(600.0, "collective timeout: a rank that stops answering fails the job after this, "
                               "naming the phase", ge=0, changes_run=False)


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = setting(1, "save at the end of every N epochs (0: never)", ge=0, changes_run=False)
    every_steps: int = setting(0, "also save every N optimizer steps (0: never)", ge=0, changes_run=False)
    keep_last: int = setting(3, "newest checkpoints kept on disk", gt=0, changes_run=False)
    keep_best: bool = setting(True, "also keep the checkpoint with the best `best_metric`", changes_run=False)
    best_metric: str = setting("", "evaluation metric that ranks checkpoints, e.g. `test_acc` (empty: the task's "
                               "first metric)", changes_run=False)
    resume: str = setting("auto", "`auto` (newest valid checkpoint in `run.dir`), `never`, or a checkpoint path",
                          check=_existing_checkpoint, changes_run=False)
    async_: bool = setting(False, "write checkpoints in a background thread: training waits only for a copy of the "
                           "state in host memory (same atomic files; the stop checkpoint is always waited for)",
                           changes_run=False)


@dataclass(frozen=True)
class RunConfig:
    dir: str = setting("", "run directory; empty: `runs/<name>-<fingerprint>`, a hash of the keys that change "
                       "the run, so that re-running a command resumes it", changes_run=False)
    name: str = setting("", "name used for the default run directory (empty: the task's name)", changes_run=False)
    seed: int = setting(0, "seed of the model initialisation, the sample order and random transforms", ge=0)
    deterministic: bool = setting(False, "deterministic kernels (slower; with fp32 on CPU, resume is bit-exact)")
    log_every: int = setting(50, "optimizer steps between training-loss lines", gt=0, changes_run=False)
    progress: str = setting("auto", "`auto` (a bar on a terminal, plain lines otherwise), `bar`, `lines`, `quiet`",
                            choices=("auto", "bar", "lines", "quiet"), changes_run=False)
    tensorboard: bool = setting(False, "also write TensorBoard event files into the run directory (needs the "
                                "`tensorboard` package: pip install -e '.[tensorboard]')", changes_run=False)
    debug: bool = setting(False, "one process, a few batches per epoch, data loaded in the main process (pdb "
                          "works), anomaly detection, deterministic kernels, full tracebacks, a model summary")


def _sbatch_options(options: tuple[str, ...]) -> str | None:
    bad = [o for o in options if "=" not in o or not o.split("=", 1)[0].strip()]
    return f"has {bad[0]!r}, which is not KEY=VALUE (e.g. exclude=node7)" if bad else None


@dataclass(frozen=True)
class SlurmConfig:
    """Defaults of ``python -m launcher submit`` (its flags win); training itself ignores this section."""

    nodes: int = setting(1, "nodes to allocate (`--nodes`)", gt=0, changes_run=False)
    tasks_per_node: int = setting(0, "ranks per node (`--tasks-per-node`); 0: one per GPU, or 1 without GPUs",
                                  ge=0, changes_run=False)
    gpus_per_node: int = setting(0, "GPUs per node (`--gpus-per-node`)", ge=0, changes_run=False)
    cpus_per_task: int = setting(0, "cores per rank (`--cpus-per-task`); 0: SLURM's default", ge=0, changes_run=False)
    mem: str = setting("", "memory per node, e.g. `64G` (`--mem`); empty: SLURM's default", changes_run=False)
    time_min: int = setting(60, "wall-clock limit in minutes (`--time`); the job checkpoints and requeues near it",
                            gt=0, changes_run=False)
    partition: str = setting("", "partition (`--partition`); empty: the cluster's default", changes_run=False)
    account: str = setting("", "account to charge (`--account`)", changes_run=False)
    qos: str = setting("", "quality of service (`--qos`)", changes_run=False)
    constraint: str = setting("", "node features, e.g. `a100` (`--constraint`)", changes_run=False)
    job_name: str = setting("", "job name (`--job-name`); empty: the run's name", changes_run=False)
    max_timeout_requeues: int = setting(3, "requeues after reaching the time limit before the job gives up "
                                        "(preemptions are not counted)", ge=0, changes_run=False)
    signal_delay_s: int = setting(120, "seconds before the time limit at which the ranks are told to checkpoint",
                                  gt=0, changes_run=False)
    sbatch: tuple[str, ...] = setting((), "more sbatch options as KEY=VALUE, e.g. `[exclude=node7]` (`--sbatch`)",
                                      check=_sbatch_options, changes_run=False)
    log_dir: str = setting("runs/submitit", "where submitit writes the job logs and pickles", changes_run=False)


@dataclass(frozen=True)
class Config:
    """The sections every task has; a task subclasses sections and this root to add its own keys."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        """Rules that span several keys; a task's config overrides this and raises ConfigError."""


C = TypeVar("C", bound=Config)

#: Keys that moved; using the old name is an error that names the new one.
RENAMED = {
    "train.lr": "optim.lr",
    "train.momentum": "optim.momentum",
    "train.weight_decay": "optim.weight_decay",
    "train.warmup_epochs": "sched.warmup_epochs",
}


# ----------------------------------------------------------------------------------- the schema


def field_name(key: str) -> str:
    """The dataclass field behind one part of a key: a Python keyword (``checkpoint.async``) cannot be a
    field name, so such a key is stored in a field with a trailing underscore (``async_``)."""
    return key + "_" if keyword.iskeyword(key) else key


def key_name(field: str) -> str:
    """The key a user types for a field: ``async_`` -> ``async``; every other name is unchanged."""
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


def _rename_keys(data: Any, rename: Callable[[str], str]) -> Any:
    if isinstance(data, dict):
        return {rename(k) if isinstance(k, str) else k: _rename_keys(v, rename) for k, v in data.items()}
    return data


@dataclass(frozen=True)
class Leaf:
    """One settable key of a schema, with its documentation and validation."""

    key: str
    type: Any
    default: Any
    doc: str
    meta: dict[str, Any]


def leaves(schema: type = Config, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of ``schema`` in declaration order, e.g. ``Leaf("train.batch_size", int, 512, ...)``."""
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from leaves(hint, f"{prefix}{key_name(f.name)}.")  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield Leaf(f"{prefix}{key_name(f.name)}", hint, default, f.metadata.get("doc", ""), dict(f.metadata))


def fingerprint(cfg: Config) -> str:
    """A short hash of everything that changes what a run trains (keys with ``changes_run=True``).

    The default run directory is named after it: the same command resumes, a changed value starts anew.
    """
    values = {leaf.key: yaml_scalar(get(cfg, leaf.key)) for leaf in leaves(type(cfg)) if leaf.meta["changes_run"]}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def schema_keys(schema: type = Config) -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``train.batch_size``."""
    return [leaf.key for leaf in leaves(schema)]


def _closest(key: str, schema: type) -> str:
    """A hint naming the valid key closest to ``key`` (or the list of sections)."""
    keys = schema_keys(schema)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # a right leaf under a wrong section: "training.epochs" -> "train.epochs"
        leaf = key.rsplit(".", 1)[-1]
        match = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
        match = [k for k in keys if match and k.endswith("." + match[0])][:1]
    return f"did you mean '{match[0]}'?" if match else "valid sections: " + ", ".join(sorted({k.split('.')[0] for k in keys}))


def _unknown(key: str, source: str, schema: type) -> ConfigError:
    if key in RENAMED:
        new = RENAMED[key]
        return ConfigError(f"'{key}' (from {source}) was renamed to '{new}'; write {new}=... on the command line, or "
                           f"put it under '{new.split('.')[0]}:' in the YAML file.")
    return ConfigError(f"Unknown configuration key '{key}' (from {source}): {_closest(key, schema)} "
                       "Every key is listed by --help and in the README under 'Configuration'.")


def _check_keys(layer: Any, source: str, schema: type) -> None:
    """Reject unknown keys by their full dotted name (OmegaConf reports only the first unknown level)."""
    known = set(schema_keys(schema))
    for key, _ in flatten(OmegaConf.to_container(layer)):  # type: ignore[arg-type]
        if key not in known:
            raise _unknown(key, source, schema)


def _explain(err: OmegaConfBaseException, source: str, schema: type) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError):
        return _unknown(key, source, schema)
    if isinstance(err, ValidationError):
        detail = str(err).splitlines()[0]
        return ConfigError(f"Invalid value for '{key}' (from {source}): {detail}. "
                           f"Give a value of the type of the default, e.g. {key}={_default_of(key, schema)}.")
    return ConfigError(f"Invalid configuration (from {source}): {err}")


def yaml_scalar(value: Any) -> Any:
    """A default as it is typed on the command line (``true``, ``fp32``, ``[0.9,0.999]``)."""
    if isinstance(value, bool):
        return str(value).lower()  # YAML spelling, as it would be typed on the command line
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return value.value if isinstance(value, Enum) else value


def _default_of(key: str, schema: type) -> Any:
    found = [leaf.default for leaf in leaves(schema) if leaf.key == key]
    return yaml_scalar(found[0]) if found else "..."


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override '{item}' is not of the form key=value; write for example train.epochs=3.")
    # Values are parsed as YAML scalars (true, 3, 1e-3, null, [0.9,0.95]), like the files.
    return OmegaConf.from_dotlist(list(overrides))


def _load_file(path: Path, schema: type) -> Any:
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass an existing file with --config "
                          "(the shipped ones are in configs/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"Config file '{path}' is empty (or only comments); put sections in it (train:, optim:, "
                          "...), or leave out --config to use the defaults.")
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, train:, ...).")
    # A section whose keys are all commented out reads as None: treat it as empty, not as a bad key.
    data = {k: ({} if v is None else v) for k, v in data.items()}
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:  # e.g. a YAML date, which no key of the schema can hold
        raise _explain(e, str(path), schema) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Merge ``schema``'s defaults, an optional YAML file and dotted overrides into a validated config."""
    merged = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        layers.append((_load_file(Path(path), schema), str(path)))
    if overrides:
        layers.append((_parse_overrides(overrides), "the command line"))
    for layer, source in layers:
        _check_keys(layer, source, schema)
        try:
            merged = OmegaConf.merge(merged, _rename_keys(OmegaConf.to_container(layer), field_name))
        except OmegaConfBaseException as e:
            raise _explain(e, source, schema) from None
    cfg: C = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def get(cfg: Any, key: str) -> Any:
    """The value at a dotted key, e.g. ``get(cfg, "train.batch_size")``."""
    for part in key.split("."):
        cfg = getattr(cfg, field_name(part))
    return cfg


def _leaf_problem(leaf: Leaf, value: Any) -> str | None:
    meta = leaf.meta
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if meta.get("choices") and value not in meta["choices"]:
        return f"is '{value}', which is not one of {', '.join(map(str, meta['choices']))}"
    # Written as "not (x > bound)" so that NaN, which compares false with everything, is rejected too.
    if meta.get("gt") is not None and not value > meta["gt"]:
        return f"must be greater than {meta['gt']:g}, got {value}"
    if meta.get("ge") is not None and not value >= meta["ge"]:
        return f"must not be below {meta['ge']:g}, got {value}"
    return meta["check"](value) if meta.get("check") else None


def validate(cfg: Config) -> None:
    """Run every field's own validation (choices, ranges, checks); raise ConfigError on the first failure."""
    for leaf in leaves(type(cfg)):
        value = get(cfg, leaf.key)
        problem = _leaf_problem(leaf, value)
        if problem:
            example = leaf.meta["choices"][0] if leaf.meta.get("choices") else yaml_scalar(leaf.default)
            raise ConfigError(f"'{leaf.key}' {problem}; set for example {leaf.key}={example}.")
    cfg.check()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of builtins (enums as their values), for YAML, JSON and checkpoints."""
    return _rename_keys(_plain(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)), key_name)


def _plain(value: Any) -> Any:
    # Tuples (e.g. optim.betas) become lists: what YAML and JSON hold, and what a file gives back.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: C, **sections: dict[str, Any]) -> C:
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
