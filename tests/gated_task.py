"""A training module whose start waits at a gate, for the submit tests: ``main`` writes ``<gate>.ready``
and then waits for ``<gate>.go`` before handing over to ``trainers.cifar``. A signal sent while it waits
reaches submitit's own handler, as one that arrives in the first moments of a job would."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

GATE_VARIABLE = "TEST_SUBMIT_GATE"


def main(argv: Sequence[str] | None = None) -> int:
    from trainers.cifar import main as train

    if argv is not None and "--print-config" in argv:  # submit's check of the configuration: no gate
        return train(argv)
    gate = Path(os.environ[GATE_VARIABLE])
    gate.with_suffix(".ready").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not gate.with_suffix(".go").exists():  # the test opens the gate; bounded in case it never does
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.05)
    return train(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
