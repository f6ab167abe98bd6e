"""Device-aware defaults: what ``auto`` means for precision, memory format and compilation.

    cfg, chosen = resolve_auto(task.cfg, DeviceTraits.of(rt.device))
    # chosen: {"train.precision": "bf16", "model.channels_last": True, "model.compile": True} on an A100

On CUDA all three help: bf16 (fp16 with a GradScaler before Ampere) runs on tensor cores, NHWC
convolutions feed them without transposes, and torch.compile fuses the small element-wise kernels that
dominate fast recipes. On the CPU, channels_last is on where oneDNN runs the convolutions (1.15-1.8x
faster per step on this project's machine, measured in ``python -m bench``); fp32 stays, because bf16
changes the numbers a run produces and resume is bit-exact only in fp32 (bf16 is an opt-in; it is
about 2x faster on CPUs with native bf16 and slower on those without); and compile stays off, since its
start-up of tens of seconds is not repaid by short CPU runs. ``true``/``false`` or an explicit precision
always wins. The run's fingerprint and ``config.yaml`` keep ``auto``, so the same command resumes the
same run on another kind of device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from launcher.config import get, replace
from trainers.core.config import Precision

C = TypeVar("C")


@dataclass(frozen=True)
class DeviceTraits:
    """What the ``auto`` choices depend on: the device kind and what it supports."""

    kind: str  # "cuda" or "cpu"
    bf16: bool = False  # CUDA: native bfloat16 (Ampere and newer)
    triton: bool = False  # CUDA: torch.compile's GPU code generator is installed
    onednn: bool = False  # CPU: convolutions run by oneDNN (mkldnn), which prefers NHWC

    @classmethod
    def of(cls, device: torch.device) -> DeviceTraits:
        if device.type != "cuda":
            return cls(device.type, onednn=torch.backends.mkldnn.is_available())
        from torch.utils._triton import has_triton  # private, but the check torch.compile itself relies on

        return cls("cuda", bf16=torch.cuda.is_bf16_supported(including_emulation=False), triton=has_triton())


#: The keys whose default, ``auto``, is decided per device.
AUTO_KEYS = ("train.precision", "model.channels_last", "model.compile")


def auto_choices(traits: DeviceTraits, debug: bool) -> dict[str, Any]:
    """The value ``auto`` takes for each key on a device with ``traits`` (the module docstring says why)."""
    cuda = traits.kind == "cuda"
    precision = (Precision.bf16 if traits.bf16 else Precision.fp16) if cuda else Precision.fp32
    # run.debug: eager mode, so that breakpoints and tracebacks point into the user's model
    return {"train.precision": precision, "model.channels_last": cuda or traits.onednn,
            "model.compile": cuda and traits.triton and not debug}


def resolve_auto(cfg: C, traits: DeviceTraits) -> tuple[C, dict[str, Any]]:
    """``cfg`` with every ``auto`` of the keys above replaced for this device, and what was chosen."""
    choices = auto_choices(traits, cfg.run.debug)  # type: ignore[attr-defined]
    chosen = {key: value for key, value in choices.items() if _is_auto(get(cfg, key))}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in chosen.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return replace(cfg, **sections), chosen


def settle(task: Any, traits: DeviceTraits) -> dict[str, Any]:
    """Make sure ``task.cfg`` holds this device's values and ``task.given`` the user's (with ``auto``s); returns
    what each ``auto`` became.

    ``run_task`` resolves once and builds the task with the resolved config; a task built by hand (a
    notebook, a test) is resolved here, before the trainer asks it to build anything."""
    if task.given is None:
        task.given = task.cfg
        task.cfg, _ = resolve_auto(task.cfg, traits)
    return {key: get(task.cfg, key) for key in AUTO_KEYS if _is_auto(get(task.given, key))}


def describe_choices(chosen: dict[str, Any], kind: str) -> str:
    """One line for the start-up table, e.g. ``train.precision=fp32, model.compile=false (auto on cpu)``."""
    shown = [f"{key}={_shown(value)}" for key, value in chosen.items()]
    return f"{', '.join(shown)}  (auto on {kind})" if shown else "none (every device-dependent key is explicit)"


def _is_auto(value: Any) -> bool:
    return value is Precision.auto or value == "auto"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(getattr(value, "value", value))
