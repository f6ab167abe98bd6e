"""The configuration engine: typed schemas of dataclasses, YAML files, and ``key=value`` overrides.

A schema is a frozen dataclass of sections, each a frozen dataclass of leaves declared with ``setting()``:
its default, one line of documentation and its validation (choices, ranges, a custom check) sit beside
the field. The training sections every task shares live beside the trainer (``trainers.core.config``);
this module knows no training key. It holds only what the launcher itself needs (``DistConfig``,
``SlurmConfig``) and the machinery:

    cfg = load_config("configs/my_task.yaml", ["train.epochs=3"], schema=MyTaskConfig)

Merging and type checking are OmegaConf's (structured configs); this module adds what it lacks:
errors that name the closest valid key, renamed-key messages (a schema's ``renamed`` mapping),
per-field validation, a fingerprint of the keys that change a run, and a frozen, plain-Python result.
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
            ge: float | None = None, le: float | None = None, lt: float | None = None,
            check: Callable[[Any], str | None] | None = None, changes_run: bool = True) -> Any:
    """A config leaf: default, one line of documentation, and its validation beside it.

    ``choices``: allowed values; ``gt`` / ``ge``: lower bounds, ``le`` / ``lt``: upper bounds (NaN is always
    rejected);
    ``check``: a function returning an error message for a bad value, or None;
    ``changes_run=False``: the key does not change what is trained (workers, logging, where files
    go), so it is left out of the run's fingerprint and changing it resumes the same run.
    """
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "gt": gt, "ge": ge, "le": le, "lt": lt,
            "check": check, "changes_run": changes_run}
    return field(default=default, metadata=meta)


def redefault(section: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``section`` with a new default, keeping its documentation and validation.

        class MyOptim(OptimConfig):
            name: str = redefault(OptimConfig, "name", "adamw")
    """
    inherited = {f.name: f for f in dataclasses.fields(section)}[name]
    return field(default=default, metadata=inherited.metadata)


@dataclass(frozen=True)
class DistConfig:
    backend: str = setting("auto", "`auto` (nccl with CUDA, else gloo), `nccl` or `gloo`",
                           choices=("auto", "nccl", "gloo"), changes_run=False)
    device: str = setting("auto", "`auto` (cuda:LOCAL_RANK when CUDA is available, else cpu), `cuda` or `cpu`",
                          choices=("auto", "cuda", "cpu"), changes_run=False)
    timeout_s: float = setting(600.0, "collective timeout: a rank that stops answering fails the job after this, "
                               "naming the phase", gt=0, changes_run=False)
    strategy: str = setting("ddp", "`ddp` (every rank holds the whole model; single-file checkpoints) or `fsdp` "
                            "(FSDP2: parameters, gradients and optimizer state sharded over the ranks; sharded "
                            "checkpoints that load at any world size)", choices=("ddp", "fsdp"))


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


C = TypeVar("C")


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


def leaves(schema: type, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of ``schema`` in declaration order, e.g. ``Leaf("train.batch_size", int, 512, ...)``."""
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from leaves(hint, f"{prefix}{key_name(f.name)}.")  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield Leaf(f"{prefix}{key_name(f.name)}", hint, default, f.metadata.get("doc", ""), dict(f.metadata))


def fingerprint(cfg: Any) -> str:
    """A short hash of everything that changes what a run trains (keys with ``changes_run=True``).

    The default run directory is named after it: the same command resumes, a changed value starts anew.
    """
    values = {leaf.key: yaml_scalar(get(cfg, leaf.key)) for leaf in leaves(type(cfg)) if leaf.meta["changes_run"]}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def schema_keys(schema: type) -> list[str]:
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
    renamed: dict[str, str] = getattr(schema, "renamed", {})
    if key in renamed:
        new = renamed[key]
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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, schema: type[C]) -> C:
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
    if meta.get("le") is not None and not value <= meta["le"]:
        return f"must not be above {meta['le']:g}, got {value}"
    if meta.get("lt") is not None and not value < meta["lt"]:
        return f"must be below {meta['lt']:g}, got {value}"
    return meta["check"](value) if meta.get("check") else None


def validate(cfg: Any) -> None:
    """Run every field's own validation (choices, ranges, checks); raise ConfigError on the first failure."""
    for leaf in leaves(type(cfg)):
        value = get(cfg, leaf.key)
        problem = _leaf_problem(leaf, value)
        if problem:
            example = leaf.meta["choices"][0] if leaf.meta.get("choices") else yaml_scalar(leaf.default)
            raise ConfigError(f"'{leaf.key}' {problem}; set for example {leaf.key}={example}.")
    check = getattr(cfg, "check", None)
    if check is not None:  # rules that span several keys (a schema's own check())
        check()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (enums as their values), for YAML, JSON and checkpoints."""
    return _rename_keys(_plain(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)), key_name)


def _plain(value: Any) -> Any:
    # Tuples (e.g. optim.betas) become lists: what YAML and JSON hold, and what a file gives back.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: C, **sections: dict[str, Any]) -> C:
    """A copy of ``cfg`` with some leaves changed, e.g. ``replace(cfg, run={"dir": "x"})``."""
    changed = {name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(cfg, **changed)  # type: ignore[type-var]


def flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs of a nested dict, for one-line-per-key displays."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


#: Names that moved to ``trainers.core.config`` (the training sections live beside the trainer).
_MOVED = ("Config", "Precision", "DataConfig", "ModelConfig", "TrainConfig", "OptimConfig", "SchedConfig",
          "EvalConfig", "CheckpointConfig", "RunConfig")


def __getattr__(name: str) -> Any:
    # PEP 562: an old import gets a message naming the new place instead of a bare AttributeError. The
    # launcher never imports the trainers, so this cannot simply re-export them.
    if name in _MOVED:
        raise ImportError(f"launcher.config.{name} moved to trainers.core.config: write "
                          f"`from trainers.core.config import {name}`.")
    raise AttributeError(f"module 'launcher.config' has no attribute {name!r}")
