"""Stopping together: ranks agree at step boundaries on what each of them saw (a stop signal, and any
other fact the trainer adds), so that every rank acts at the same step.

The agreement is one small all-reduce on the control group. Done at every step it would cost a
round trip per step; so it runs about every ``interval_s`` seconds of training: the same all-reduce
carries the slowest rank's time per step since the previous agreement, from which every rank derives the
same number of steps to the next one.
"""

from __future__ import annotations

import time

from launcher.runtime import Runtime
from launcher.signals import StopFlag

__all__ = ["StopAgreement"]


class StopAgreement:
    """Agrees on a stop signal (and extra facts, each the maximum over ranks) about every ``interval_s``."""

    def __init__(self, rt: Runtime, flag: StopFlag | None = None, interval_s: float = 0.2,
                 max_steps: int = 100) -> None:
        self.rt = rt
        self.flag = flag or StopFlag()
        self.interval_s, self.max_steps = interval_s, max_steps
        self.every = 1  # steps between agreements, the same on every rank (derived from agreed values)
        self._last = (time.perf_counter(), 0)  # (time, step) of the previous agreement

    def due(self, step: int) -> bool:
        """True at the steps where ranks agree (every rank gives the same answer)."""
        return step % self.every == 0

    def agree(self, step: int, **facts: float) -> dict[str, float]:
        """``stop`` (1 if any rank received a signal) and every fact, each the maximum over ranks; a
        collective: call it on every rank at the same step (where ``due`` says so)."""
        now = time.perf_counter()
        per_step = (now - self._last[0]) / max(1, step - self._last[1])
        values = self.rt.max_all([float(self.flag.requested), per_step, *facts.values()], "stop agreement")
        self._last = (now, step)
        slowest = values[1]
        self.every = max(1, min(self.max_steps, int(self.interval_s / slowest) if slowest > 0 else 1))
        return {"stop": values[0], **dict(zip(facts, values[2:]))}
