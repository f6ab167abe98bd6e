"""The language-model task with a per-sample ledger: after every optimizer step, the sample indices this rank
trained on are appended to ``RUN_DIR/ledger-rank<R>.txt`` as ``STEP index,index,...``, so that a test can rebuild
which samples each global step saw across interruptions and world sizes.

    python -m tests.ledger_lm --config configs/lm_debug.yaml [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from trainers.core import BatchInfo, run_task
from trainers.lm import LMTask


class LedgerLM(LMTask):
    pending = ""

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        if info.train:
            self.pending = ",".join(str(i) for i in info.index.tolist())
        return super().transform(batch, info)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        with open(Path(self.cfg.run.dir) / f"ledger-rank{self.rank}.txt", "a") as f:
            f.write(f"{step} {self.pending}\n")


if __name__ == "__main__":
    sys.exit(run_task(LedgerLM, sys.argv[1:]))
