"""Start from pretrained weights (``model.init_from``) and freeze parts of a model (``model.freeze``).

``init_from`` takes a ``model.pt`` of this toolkit, a full checkpoint of this toolkit, or any plain
state_dict. Loading is non-strict and reported key by key, so a new classification head (its keys
missing or shape-mismatched) is obvious; a file of which nothing matches is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from launcher.config import ConfigError
from launcher.errors import CheckpointError
from trainers.core.checkpoint.storage import load_checkpoint
from trainers.core.parallel import strip_prefixes

__all__ = ["InitReport", "init_from", "freeze"]

_WRAPPERS = ("model", "state_dict", "model_state_dict")  # where other tools nest the weights


@dataclass
class InitReport:
    """What ``init_from`` did: keys loaded, and keys it could not use."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)  # in both, different shapes: left as initialised

    def lines(self) -> list[str]:
        out = [f"init_from {self.path}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("shape mismatch (kept the new initialisation)", self.mismatched),
                            ("missing from the file (kept the new initialisation)", self.missing),
                            ("not in the model (ignored)", self.unexpected)):
            if keys:
                out.append(f"  {label}: {_summary(keys)}")
        return out


def _summary(keys: list[str], shown: int = 8) -> str:
    more = f" ... (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _weights(path: Path) -> dict[str, Any]:
    """The state_dict inside ``path``: a plain one, or nested in a checkpoint under a known key."""
    state = load_checkpoint(path, map_location="cpu")  # weights_only, manifest-verified in a run dir
    for key in _WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"model.init_from={path} holds no tensors (keys: {_summary(list(state))}); give a "
                              "model.pt, a checkpoint of this toolkit or a state_dict file.")
    return strip_prefixes(tensors)


def init_from(model: nn.Module, path: str | Path) -> InitReport:
    """Copy every tensor of ``path`` whose name and shape match into ``model``; report the rest."""
    source = _weights(Path(path))
    target = model.state_dict()
    report = InitReport(str(path))
    usable = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif target[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)}->{tuple(target[key].shape)}")
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in target if k not in source]
    if not usable:
        raise CheckpointError(
            f"model.init_from={path}: none of its {len(source)} tensors matches the model by name and shape "
            f"(file: {_summary(list(source), 3)}; model: {_summary(list(target), 3)}). It was saved from a "
            "different model: check model.name, or convert the key names.")
    model.load_state_dict(usable, strict=False)
    return report


def freeze(model: nn.Module, prefixes: str) -> list[str]:
    """Stop gradients for parameters whose names start with one of the comma-separated ``prefixes``."""
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    frozen: list[str] = []
    for prefix in wanted:
        hits = [(n, p) for n, p in model.named_parameters() if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            top = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
            raise ConfigError(f"model.freeze: no parameter name starts with '{prefix}'; the model's top-level "
                              f"parts are {_summary(top, 12)}.")
        for name, p in hits:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
