"""A model summary for debug runs: parameter count and the output shape of every layer for one batch.

Captured with forward hooks on one real batch, so it shows what the model does with the task's own
inputs (any nesting of tensors), not with a guessed input size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from rich.table import Table



def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape))
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


@torch.no_grad()
def model_summary(model: nn.Module, inputs: Any) -> Table:
    """Every leaf module with its output shape and parameter count, for one forward pass of ``inputs``."""
    rows: list[tuple[str, str, str, int]] = []
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append((name or "(model)", type(module).__name__, _shape(output), params))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in leaves]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = Table(title=f"model: {total:,} parameters ({trainable:,} trainable); input {_shape(inputs)}",
                  title_justify="left")
    for column in ("layer", "type", "output", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for name, kind, shape, params in rows:
        table.add_row(name, kind, shape, f"{params:,}")
    return table


__all__ = ["model_summary"]
