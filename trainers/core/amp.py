"""Precision policy: autocast and GradScaler exactly where they belong, no-ops in fp32.

    amp = Amp(cfg.train.precision, device)
    with amp.autocast():
        loss = model(x)
    amp.backward(loss)
    amp.step(optimizer, params, max_norm)   # unscales before clipping; skips steps with inf/nan (fp16)
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable

import torch

from trainers.core.config import Precision

_DTYPES = {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


class Amp:
    """Mixed precision for one device: bf16 autocast, or fp16 autocast with loss scaling."""

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.precision = precision
        self.device_type = device.type
        self.dtype = _DTYPES[precision]
        # Only fp16 has too little range for small gradients; bf16 has fp32's exponent.
        self.scaler = torch.amp.GradScaler(device.type) if precision is Precision.fp16 else None

    def describe(self) -> str:
        """One line for the start-up table."""
        if self.dtype is None:
            return "fp32"
        return f"{self.precision.value} autocast on {self.device_type}" + (" + GradScaler" if self.scaler else "")

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_norm: float) -> None:
        """Optimizer step; gradients are unscaled before clipping so ``max_norm`` means true norms."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when gradients hold inf/nan
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
