"""The single-file checkpoint storage: one file per step, a verified ``latest`` pointer, a manifest,
safe loading, pruning.

    storage = FileStorage(run_dir / "checkpoints", keep_last=3, keep_best=True)
    storage.save(state, step=1200, metric=0.91)     # rank 0 only; the Checkpointer does the collectives
    found = storage.load_latest()                   # (state, path), None on a fresh run, or CheckpointError

Layout of the directory::

    step-00001200.pt     torch.save of the state (zip format), written temp -> fsync -> rename
    latest               name of the newest checkpoint (one line)
    manifest.json        file name, step, metric, size and sha256 of every checkpoint

A crash at any moment leaves either the old file set or the new one, never a half-written file under a
checkpoint name. Files are written through ``trainers.core.files``; this storage knows nothing about
ranks. Another storage (sharded, ``torch.distributed.checkpoint``) implements the same ``Storage``
protocol.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from launcher.errors import CheckpointError
from trainers.core.files import TMP_MARK, atomic_write, atomic_write_text, fsync_dir

__all__ = ["Storage", "CheckpointError", "FileStorage", "CheckpointManager", "load_checkpoint"]

_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
_POINTER = "latest"
_MANIFEST = "manifest.json"
_FIX = ("Point checkpoint.resume at a good checkpoint file, or start fresh with checkpoint.resume=never "
        "in a new run.dir.")
_HASH_CHUNK = 1 << 22
_ZIP_TAIL = 22 + 65535  # the zip end record plus its longest possible comment

# Why the manifest keeps a sha256 of every file (checked with torch 2.14): torch.load(weights_only=True)
# does NOT verify the zip CRC-32 of stored records. A byte flipped anywhere inside tensor data loads
# without any error and silently yields different weights (checked at 10%..90% of a 4 MB file); only
# damage that breaks the zip structure (e.g. truncation) or the pickle stream raises. The hash is what
# turns silent bit rot into a clear rejection.


class _Unusable(Exception):
    """A checkpoint file failed verification; ``str()`` is the reason, phrased for a log line."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- safe loading


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _why_unloadable(path: Path, e: Exception) -> str:
    """Translate a torch.load failure into a reason a user can act on."""
    if isinstance(e, FileNotFoundError):
        return "file does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a checkpoint file"
    if "Weights only load failed" in str(e):
        return ("holds Python objects that weights_only=True refuses to unpickle (loading them could run "
                "code); only tensors, plain containers and numbers are allowed")
    # torch's own errors for damaged files vary (OSError EINVAL, EOFError, miniz messages), so look at
    # the zip structure directly to say which damage it is.
    return _zip_damage(path) or f"corrupt ({type(e).__name__}: {_first_line(e)})"


def _zip_damage(path: Path) -> str | None:
    """Name structural damage of a torch zip checkpoint, or None if the structure looks whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - _ZIP_TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({_first_line(e)})"
    if size == 0:
        return "truncated: empty file (0 bytes)"
    if head != b"PK\x03\x04":
        return "not a torch checkpoint (no zip header)"
    if b"PK\x05\x06" not in tail:  # the end-of-central-directory record is the last thing written
        return f"truncated: the zip end record is missing after {size} bytes (an incomplete write or copy)"
    return None


def _torch_load(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """torch.load restricted to tensors and plain data; any failure becomes ``_Unusable(reason)``."""
    try:
        # weights_only=True: the unpickler only rebuilds tensors and builtin containers, so a tampered
        # or foreign file cannot execute code in the training process.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError, ...
        raise _Unusable(_why_unloadable(path, e)) from e
    if not isinstance(state, dict):
        raise _Unusable(f"not a checkpoint: holds a {type(state).__name__}, expected a dict")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one explicit checkpoint file safely (``weights_only=True``: no code from the file runs).

    Raises CheckpointError naming the file, what is wrong with it and how to proceed.
    """
    path = Path(path)
    try:
        # A file inside a run's checkpoint folder is checked against that folder's manifest too.
        entry = FileStorage(path.parent)._read_manifest().get(path.name) if path.is_file() else None
        return FileStorage._load_verified(path, entry, map_location)
    except _Unusable as e:
        raise CheckpointError(f"Cannot load checkpoint {path}: {e}. {_FIX}") from e.__cause__


# ----------------------------------------------------------------------------------- the manager


class Storage(Protocol):
    """Where checkpoints go and how they come back; the Checkpointer decides when and what."""

    #: True when every rank writes its own part (sharded state); False when rank 0 writes the whole state.
    writes_on_every_rank: bool

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path: ...
    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None: ...
    def path_of(self, step: int) -> Path: ...
    def latest_path(self) -> Path | None: ...
    def list(self) -> builtins.list[Path]: ...
    def best_entry(self) -> dict[str, Any] | None: ...


class FileStorage:
    """Atomic, verified, pruned checkpoints in one directory (created lazily on the first save): one
    ``torch.save`` file per step, written by rank 0."""

    writes_on_every_rank = False

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_best: bool = True,
                 log: Callable[[str], None] = print) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: at least one checkpoint must be kept")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.log = log

    # ------------------------------------------------------------------ queries

    def path_of(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or would be) written."""
        return self.directory / f"step-{step:08d}.pt"

    def list(self) -> list[Path]:
        """Existing ``step-*.pt`` files, sorted by step ascending."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _STEP_RE.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    def latest_path(self) -> Path | None:
        """The file the ``latest`` pointer names if it exists, else the newest ``step-*.pt``, else None."""
        pointed = self._pointer_target()
        if pointed is not None and pointed.is_file():
            return pointed
        files = self.list()
        return files[-1] if files else None

    def best_entry(self) -> dict[str, Any] | None:
        """The manifest entry (file, step, metric, ...) of the best existing checkpoint, or None."""
        best = self.best_path()
        return self._read_manifest().get(best.name) if best is not None else None

    def best_path(self) -> Path | None:
        """The existing checkpoint with the highest recorded metric (newest on ties), else None."""
        entries = self._read_manifest()
        return self._best(entries, {p.name for p in self.list()})

    # ------------------------------------------------------------------ save

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        """Write ``step-{step:08d}.pt`` atomically, point ``latest`` at it, record it, then prune.

        Saving an existing step replaces that file atomically. Returns the checkpoint's path.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._ensure_directory()
        self._remove_stale_temps()
        path = self.path_of(step)
        entries = self._read_manifest()
        if entries.pop(path.name, None) is not None:
            # Re-saving a step: forget the old hash first, or a crash between the rename and the manifest
            # update would make the new (good) file look corrupt.
            self._write_manifest(entries)
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write_text(self.directory / _POINTER, path.name + "\n")
        entries[path.name] = {"file": path.name, "step": step, "metric": clean_metric(metric),
                              "size": path.stat().st_size, "sha256": sha256_of(path)}
        doomed = self._prunable(entries, keep={path.name})
        # The manifest is durable before anything is deleted: a crash mid-prune leaves extra files, never
        # a manifest that vouches for files that are gone while the good ones are unrecorded.
        self._write_manifest({k: v for k, v in entries.items() if k not in doomed})
        for name in doomed:
            (self.directory / name).unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.directory)
        return path

    def _ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)  # the new directory entry must survive a crash too

    def _remove_stale_temps(self) -> None:
        # Single writer (rank 0), so any temp file now is debris from a save that was killed.
        for p in self.directory.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
                p.unlink(missing_ok=True)
                self.log(f"checkpoint: removed {p}, left behind by an interrupted save")

    def _prunable(self, entries: dict[str, dict[str, Any]], keep: set[str]) -> set[str]:
        """Names to delete: all but the newest ``keep_last``, the best, ``latest`` and ``keep``."""
        names = [p.name for p in self.list()]
        keep = set(keep) | set(names[-self.keep_last:])
        pointed = self._pointer_target()
        if pointed is not None:
            keep.add(pointed.name)  # never delete what `latest` names, whatever its step
        if self.keep_best and (best := self._best(entries, set(names))) is not None:
            keep.add(best.name)
        return set(names) - keep

    # ------------------------------------------------------------------ load

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that verifies, as ``(state, path)``; None when there are none at all.

        Tries the ``latest`` pointer's file first, then the others newest to oldest. Each rejected file
        is reported through ``log``. Raises CheckpointError when files exist but none is usable, rather
        than silently starting over on top of saved work.
        """
        candidates = self._candidates()
        if not candidates:
            return None
        entries = self._read_manifest()
        rejected: builtins.list[tuple[Path, str]] = []
        for path in candidates:
            try:
                state = self._load_verified(path, entries.get(path.name), map_location)
            except _Unusable as e:
                rejected.append((path, str(e)))
                continue
            for bad, reason in rejected:
                self.log(f"checkpoint: {bad} is unusable ({reason}); resuming from the previous checkpoint "
                         f"{path.name} instead")
            return state, path
        raise CheckpointError(self._none_usable_message(rejected))

    def _candidates(self) -> builtins.list[Path]:
        files = self.list()[::-1]
        pointed = self._pointer_target()
        if pointed is None:
            return files
        if not pointed.is_file():
            self.log(f"checkpoint: the '{_POINTER}' pointer names {pointed}, which does not exist; "
                     "using the newest checkpoint file instead")
            return files
        return [pointed] + [p for p in files if p != pointed]

    @staticmethod
    def _load_verified(path: Path, entry: dict[str, Any] | None, map_location: str | torch.device
                       ) -> dict[str, Any]:
        # Size and hash before torch.load, which accepts flipped bytes inside tensor data (note at the top).
        if entry is not None:
            _check_recorded(path, entry)
        return _torch_load(path, map_location)

    def _none_usable_message(self, rejected: builtins.list[tuple[Path, str]]) -> str:
        lines = "\n".join(f"  {p.name}: {reason}" for p, reason in rejected)
        return (f"No usable checkpoint in {self.directory}: all {len(rejected)} checkpoint file(s) failed "
                f"verification:\n{lines}\nRefusing to start over on top of saved work. {_FIX}")

    # ------------------------------------------------------------------ pointer and manifest

    def _pointer_target(self) -> Path | None:
        return read_pointer(self.directory, _STEP_RE)

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        """Entries by file name; a missing or unreadable manifest means no hashes (torch.load still checks)."""
        path = self.directory / _MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {e["file"]: e for e in data["checkpoints"] if _STEP_RE.match(e["file"])}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"checkpoint: ignoring unreadable {path} ({_first_line(e)}); files are checked by "
                     "loading them instead")
            return {}

    def _write_manifest(self, entries: dict[str, dict[str, Any]]) -> None:
        ordered = sorted(entries.values(), key=lambda e: e["step"])
        text = json.dumps({"format": 1, "checkpoints": ordered}, indent=1, allow_nan=False)
        atomic_write_text(self.directory / _MANIFEST, text + "\n")

    def _best(self, entries: dict[str, dict[str, Any]], existing: set[str]) -> Path | None:
        scored = [(e["metric"], e["step"], name) for name, e in entries.items()
                  if name in existing and e.get("metric") is not None]
        return self.directory / max(scored)[2] if scored else None


def read_pointer(directory: Path, names: re.Pattern[str]) -> Path | None:
    """The checkpoint the ``latest`` file of ``directory`` names, if that name matches ``names``."""
    try:
        name = (directory / _POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    # Only a bare checkpoint name counts: a hand-edited pointer must not escape the directory.
    return directory / name if names.match(name) else None


def _check_recorded(path: Path, entry: dict[str, Any]) -> None:
    """Compare the file with its manifest entry: size first (cheap, names truncation), then sha256."""
    try:
        size = path.stat().st_size
        if isinstance(entry.get("size"), int) and size != entry["size"]:
            what = "truncated" if size < entry["size"] else "size mismatch"
            raise _Unusable(f"{what}: {size} bytes, {_MANIFEST} recorded {entry['size']}")
        if entry.get("sha256") and sha256_of(path) != entry["sha256"]:
            raise _Unusable(f"corrupt: hash mismatch, sha256 differs from the one in {_MANIFEST}")
    except OSError as e:
        raise _Unusable(f"unreadable ({_first_line(e)})") from e


def clean_metric(metric: float | None) -> float | None:
    # NaN/inf cannot be "best" in any meaningful sense (and are not valid JSON): record them as None.
    if metric is None:
        return None
    value = float(metric)
    return value if math.isfinite(value) else None


#: The name tests and earlier code use for the single-file storage.
CheckpointManager = FileStorage
