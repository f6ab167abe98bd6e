"""CIFAR (synthetic) whose training inputs turn NaN in chosen steps, for the train.nonfinite tests:
``NAN_STEPS=3,4`` makes the batches of global steps 3 and 4 (1-based) NaN, in any epoch where they fall."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

from trainers.cifar import CifarTask
from trainers.core import BatchInfo, run_task


class NanTask(CifarTask):
    name = "nan"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.nan_steps = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}
        self.calls = 0

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        x, y = super().transform(batch, info)
        if info.train:
            self.calls += 1  # one training batch per optimizer step (no accumulation in these tests)
            if self.calls in self.nan_steps:
                x = torch.full_like(x, float("nan"))
        return x, y


def main(argv: Sequence[str] | None = None) -> int:
    return run_task(NanTask, argv, prog="python -m tests.nan_task")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
