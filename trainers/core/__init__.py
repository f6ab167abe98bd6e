"""The shared machinery every task uses: the loop, data order and loaders, precision, parallel
wrapping, checkpoints, metrics and outputs. A task imports what it needs from here:

    from trainers.core import Task, TensorSplit, run_task

Names are imported on first use (PEP 562), so that importing a light submodule such as
``trainers.core.cli`` does not import torch: ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Task": "task", "BatchInfo": "task", "TensorSplit": "data", "run_task": "entry", "Trainer": "trainer",
    "Metric": "metrics", "Accuracy": "metrics", "MeanLoss": "metrics", "ConfusionMatrix": "metrics",
    "MeanIoU": "metrics",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainers.core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainers.core.{_EXPORTS[name]}"), name)
