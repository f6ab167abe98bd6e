"""Tasks with the mistakes users make, for the error-reporting tests: ``BUG=loss`` raises inside the task's own
loss (a bug in user code), ``BUG=config`` is a task whose class does not name its config (``config = ...``)."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

from trainers.cifar import CifarTask
from trainers.core import run_task
from trainers.core.config import Config


def scale_of(batch: Any) -> float:
    return 1 / len(batch[1][:0])  # the user's helper: divides by zero


class BuggyTask(CifarTask):
    name = "buggy"

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        return super().loss(outputs, batch) * scale_of(batch)


class ForgetfulTask(CifarTask):
    name = "forgetful"
    config = Config  # the task's own keys (data.synthetic, train.lookahead, ...) are not declared


def main(argv: Sequence[str] | None = None) -> int:
    task = ForgetfulTask if os.environ.get("BUG") == "config" else BuggyTask
    return run_task(task, argv, prog="python -m tests.buggy_task")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
