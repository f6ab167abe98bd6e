"""Preemption: signal handlers only set a flag; the training loop acts on it at a step boundary.

Saving from inside a handler can interrupt a collective or a half-written file; so the handler
records the signal and returns, and all ranks agree at the next step (one rank receiving the
signal is enough) to stop together, checkpoint and exit with ``PREEMPTED_EXIT_CODE``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

#: Exit status of a run that stopped on a signal after writing its checkpoint (EX_TEMPFAIL: "try
#: again"). A scheduler or wrapper seeing it should requeue or re-launch the same command.
PREEMPTED_EXIT_CODE = 75

#: SIGTERM: SLURM preemption/time limit and torchrun shutdown; SIGUSR1/SIGUSR2: SLURM's --signal;
#: SIGINT: Ctrl-C (a second Ctrl-C interrupts at once).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

#: A second SIGINT this soon after the first is the same Ctrl-C arriving twice (from the terminal and
#: again forwarded by torchrun's agent), not the user pressing it again.
SIGINT_REPEAT_S = 1.0

#: Exit status after an immediate interrupt (a second Ctrl-C): 128 + SIGINT, as shells report it.
INTERRUPTED_EXIT_CODE = 130


_last_received: signal.Signals | None = None


def last_stop_signal() -> signal.Signals | None:
    """The stop signal this process received last (start-up or training), or None.

    A job wrapper (``launcher.submit.TrainJob``) reads it after the run stopped to hand the signal on
    to the scheduler's own handler (submitit's checkpoint-and-requeue)."""
    return _last_received


def _note(signum: int) -> None:
    global _last_received
    _last_received = signal.Signals(signum)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; main() maps it to PREEMPTED_EXIT_CODE."""

    raised_by_every_rank = True  # all ranks agreed on the step to stop at


_stopped_during_startup = False


def _stop_now(signum: int, frame: FrameType | None) -> None:
    global _stopped_during_startup
    _note(signum)
    if not _stopped_during_startup:
        # os.write, not print: safe inside a handler.
        os.write(2, f"stopped by {signal.Signals(signum).name} during start-up: nothing new to save; re-run (or "
                    f"requeue) the same command to resume.\n".encode())
    _stopped_during_startup = True
    # SystemExit unwinds through every `finally` (the process group is torn down) and, unlike another exception,
    # ends the process cleanly even during imports. Code it interrupts can still swallow it (a bare `except:`
    # inside an import: seen under load), so StopFlag.install ends the process too.
    raise SystemExit(PREEMPTED_EXIT_CODE)


def stop_during_startup() -> None:
    """Until the training loop takes over (``StopFlag``), SIGTERM, SIGUSR1 and SIGUSR2 end the process at
    once with PREEMPTED_EXIT_CODE, so that a preempted or timed-out job is requeued instead of lost.

    Safe to raise from the handler: nothing is being saved yet. Call it as early as possible (a task
    module calls it before its heavy imports); Ctrl-C keeps its usual KeyboardInterrupt.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if sig != signal.SIGINT:
                signal.signal(sig, _stop_now)


class StopFlag:
    """Records the first stop signal received; ``install`` / ``restore`` swap the handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._at = 0.0
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a store: no I/O, no locks, nothing that could deadlock in a handler.
        if self.received is None:
            _note(signum)
            self.received = signal.Signals(signum)
            self._at = time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._at > SIGINT_REPEAT_S:
            raise KeyboardInterrupt  # Ctrl-C again: the user does not want to wait for the checkpoint

    def install(self) -> "StopFlag":
        """Take the stop signals over from the start-up handlers; ends the process with PREEMPTED_EXIT_CODE if
        a stop during start-up was received but its SystemExit was swallowed by the code it interrupted."""
        if _stopped_during_startup:
            raise SystemExit(PREEMPTED_EXIT_CODE)
        # Handlers can only be set from the main thread (e.g. not inside some notebook runners).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
