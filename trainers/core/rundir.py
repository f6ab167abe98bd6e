"""The run directory: created and claimed by rank 0, so that one directory holds one live run.

The claim is an advisory ``flock`` on ``RUN_DIR/.lock``, held until the process exits. The kernel
drops it when its holder dies in any way (exit, crash, kill -9), so a lock left behind never blocks
the next run; on network file systems without working ``flock`` the claim is as good as the file
system's locking.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from launcher.config import fingerprint
from launcher.errors import UserError

_HELD: list[int] = []  # descriptors of the locks this process holds (released by the OS at exit)


def default_run_dir(cfg: Any, task_name: str) -> Path:
    """runs/<name>-<fingerprint>: a pure function of what the command trains, so re-running it resumes."""
    return Path("runs") / f"{cfg.run.name or task_name}-{fingerprint(cfg)}"


def finished_record(run_dir: Path, fingerprint_now: str) -> dict[str, Any] | None:
    """The ``end`` record of a run in ``run_dir`` that finished with these settings (the same fingerprint), or
    None: then the run is new, unfinished, or continues with changed settings (more epochs, ...)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "start":
            return None  # started again after its last end: it has not finished since
        if record.get("kind") == "end":
            return record if record.get("fingerprint") == fingerprint_now else None
    return None


class RunDirError(UserError):
    """The run directory cannot be used: not writable, or in use by a live run."""

    same_on_every_rank = True  # rank 0 decides and tells the others
    raised_by_every_rank = True


class Claim:
    """A run directory this process holds."""

    def __init__(self, run_dir: Path, created: bool) -> None:
        self.run_dir, self.created = run_dir, created

    def withdraw(self) -> None:
        """After a refusal: remove the directory again if this claim created it and nothing else was written
        into it, so that a refused run leaves no run directory behind."""
        lock = self.run_dir / ".lock"
        if self.created and [p.name for p in self.run_dir.iterdir()] == [lock.name]:
            lock.unlink()
            self.run_dir.rmdir()


def claim(run_dir: Path) -> Claim:
    """Create ``run_dir`` and lock it for this process; RunDirError saying why not."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"The run directory {run_dir} cannot be written ({e.strerror or e}); choose another with "
                          "run.dir=PATH, or fix its permissions.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(f"The run directory {run_dir} is in use by a live run ({holder}). Wait for it to finish or "
                          "stop it, or give this run another run.dir. (A run that died does not hold it: the lock "
                          "goes with its process.)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    _HELD.append(fd)
    return Claim(run_dir, created)
