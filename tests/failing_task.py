"""CIFAR (synthetic) that fails on one rank only, for the set-up agreement tests: ``FAIL_RANK=1 FAIL_AT=data``
makes rank 1 alone raise a user error while building its data (``FAIL_AT=model``: its model), as a rank whose
data folder is missing would."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch.nn as nn

from launcher.errors import DatasetUnavailable
from launcher.runtime import Runtime
from trainers.cifar import CifarTask
from trainers.core import run_task


class FailingTask(CifarTask):
    name = "failing"

    def _fail(self, rank: int, phase: str) -> None:
        if os.environ.get("FAIL_AT") == phase and str(rank) == os.environ.get("FAIL_RANK"):
            raise DatasetUnavailable(f"/data/rank{rank} does not exist: rank {rank} cannot read its data here")

    def build_data(self, rt: Runtime) -> Any:
        self.rank = rt.rank
        self._fail(rt.rank, "data")
        return super().build_data(rt)

    def build_model(self) -> nn.Module:
        self._fail(self.rank, "model")
        return super().build_model()


def main(argv: Sequence[str] | None = None) -> int:
    return run_task(FailingTask, argv, prog="python -m tests.failing_task")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
