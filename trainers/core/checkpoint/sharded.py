"""The sharded checkpoint storage (``dist.strategy=fsdp``): one folder per step written by every rank through
``torch.distributed.checkpoint`` (DCP), which reshards on load, so a run resumes at any world size.

    storage = ShardedStorage(run_dir / "checkpoints", keep_last=3, keep_best=True, template=..., group=...)
    storage.save(state, step=1200, metric=0.91)     # every rank
    found = storage.load_latest()                   # every rank: (state, path), None on a fresh run

Layout::

    step-00001200/       .metadata and __<rank>_0.distcp (DCP: the model and optimizer shards),
                         state.pt (rank 0: everything else - position, schedule, random streams, config),
                         manifest.json (written last: step, metric, and the size and sha256 of every file)
    latest               name of the newest complete folder

Every rank writes into ``.step-00001200.partial/``; rank 0 then writes ``state.pt`` and the manifest and renames
the folder into place, so a folder under a step name is always complete and nothing is ever saved into an
existing folder. A folder without ``.metadata`` or the manifest, or whose files differ from what the manifest
recorded, is skipped on resume for the previous one.
"""

from __future__ import annotations

import builtins
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.errors import CheckpointError
from trainers.core.checkpoint.storage import clean_metric, read_pointer, sha256_of
from trainers.core.files import atomic_write, atomic_write_text, fsync_dir

__all__ = ["ShardedStorage", "SHARDED_KEYS", "is_sharded_checkpoint", "sharded_storage"]

#: The registry entries written by DCP (every rank its shards); the rest goes to state.pt.
SHARDED_KEYS = ("model", "optimizer")
_STEP_RE = re.compile(r"^step-(\d+)$")
_POINTER, _MANIFEST, _STATE = "latest", "manifest.json", "state.pt"
_FIX = ("Point checkpoint.resume at a good checkpoint folder, or start fresh with checkpoint.resume=never in a new "
        "run.dir.")


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


class ShardedStorage:
    """Folders of DCP shards, written by every rank, completed and renamed into place by rank 0."""

    writes_on_every_rank = True

    def __init__(self, directory: str | Path, keep_last: int, keep_best: bool, *, rank: int,
                 template: Callable[[], dict[str, Any]], group: Any = None,
                 log: Callable[[str], None] = print) -> None:
        self.directory = Path(directory)
        self.keep_last, self.keep_best, self.rank = keep_last, keep_best, rank
        self.template = template  # the live sharded state to load into (model and optimizer shards)
        self.group = group  # DCP's collectives: a group of their own, so a background save cannot cross training's
        self.log = log
        if rank == 0 and self.directory.is_dir():  # no rank saves yet: the debris of saves that were killed goes
            for debris in self.directory.glob(".step-*.partial"):
                shutil.rmtree(debris, ignore_errors=True)
                log(f"checkpoint: removed {debris}, left behind by an interrupted save")

    # ------------------------------------------------------------------ queries
    def path_of(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def list(self) -> builtins.list[Path]:
        """Complete step folders (``.metadata`` and manifest present), by step ascending."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _STEP_RE.match(p.name)) and (p / _MANIFEST).is_file() and (p / ".metadata").is_file()]
        return [p for _, p in sorted(found)]

    def latest_path(self) -> Path | None:
        folders = self.list()
        pointed = self._pointer_target()
        return pointed if pointed in folders else (folders[-1] if folders else None)

    def best_entry(self) -> dict[str, Any] | None:
        scored = [(e["metric"], e["step"], e) for e in map(self._manifest, self.list()) if e.get("metric") is not None]
        return max(scored, key=lambda s: (s[0], s[1]))[2] if scored else None

    # ------------------------------------------------------------------ save
    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        """Every rank: its shards into the partial folder; rank 0 then completes it and renames it into place."""
        import torch.distributed.checkpoint as dcp

        final, partial = self.path_of(step), self.directory / f".step-{step:08d}.partial"
        # No file work before DCP on one rank alone: each rank's writer creates the folder as it enters, and a rank
        # failing here would leave the others waiting in DCP's first collective (debris is removed at start-up).
        sharded = {k: state[k] for k in SHARDED_KEYS if k in state}
        # DCP's coordinator writes .metadata only after every rank reported its files written.
        dcp.save(sharded, checkpoint_id=str(partial), process_group=self.group)
        if self.rank == 0:
            self._complete(partial, final, {k: v for k, v in state.items() if k not in SHARDED_KEYS}, step, metric)
        return final

    def _complete(self, partial: Path, final: Path, rest: dict[str, Any], step: int, metric: float | None) -> None:
        atomic_write(partial / _STATE, lambda f: torch.save(rest, f))
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(partial.iterdir())}
        record = {"file": final.name, "step": step, "metric": clean_metric(metric), "files": files}
        atomic_write_text(partial / _MANIFEST, json.dumps(record, indent=1) + "\n")
        fsync_dir(partial)
        old = final.with_name(f".{final.name}.replaced")
        if final.exists():  # the same step saved again: the new folder replaces the old one whole
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        partial.rename(final)
        fsync_dir(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(self.directory / _POINTER, final.name + "\n")
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        folders = self.list()
        kept = {keep, *folders[-self.keep_last:]}
        if self.keep_best and (best := self.best_entry()) is not None:
            kept.add(self.directory / best["file"])
        for folder in folders:
            if folder not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """Every rank: the newest complete folder that verifies, loaded into this run's shards at this world size;
        None when there is none at all. Each rejected folder is reported."""
        candidates = self.list()[::-1]
        pointed = self._pointer_target()
        if pointed in candidates:
            candidates = [pointed, *(c for c in candidates if c != pointed)]
        if not candidates:
            return None
        rejected: builtins.list[tuple[Path, str]] = []
        for folder in candidates:
            try:
                state = self.load(folder, map_location)
            except CheckpointError as e:
                rejected.append((folder, str(e)))
                continue
            for bad, reason in rejected:
                self.log(f"checkpoint: {bad} is unusable ({reason}); resuming from {folder.name} instead")
            return state, folder
        lines = "\n".join(f"  {p.name}: {reason}" for p, reason in rejected)
        raise CheckpointError(f"No usable checkpoint in {self.directory}: all {len(rejected)} checkpoint folder(s) "
                              f"failed verification:\n{lines}\nRefusing to start over on top of saved work. {_FIX}")

    def load(self, folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """One folder, verified against its manifest, loaded into the live shards (every rank)."""
        import torch.distributed.checkpoint as dcp

        problem = self._damage(folder)
        if problem:
            raise CheckpointError(problem)
        sharded = self.template()
        try:
            dcp.load(sharded, checkpoint_id=str(folder), process_group=self.group)
            rest = torch.load(folder / _STATE, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException, torch.load many kinds
            raise CheckpointError(f"cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
        return {**rest, **sharded}

    def _damage(self, folder: Path) -> str | None:
        """What is wrong with a folder's files compared with its manifest, or None."""
        try:
            recorded = self._manifest(folder)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"its {_MANIFEST} is unreadable ({e})"
        for name, entry in recorded.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != entry["size"]:
                return f"{name} has {size} bytes, {_MANIFEST} recorded {entry['size']} (truncated or overwritten)"
            if sha256_of(path) != entry["sha256"]:
                return f"{name} is corrupt: its sha256 differs from the one in {_MANIFEST}"
        return None

    # ------------------------------------------------------------------ pointer and manifests
    def _manifest(self, folder: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        return data

    def _pointer_target(self) -> Path | None:
        return read_pointer(self.directory, _STEP_RE)


def sharded_storage(directory: Path, keep_last: int, keep_best: bool, rank: int, template: Callable[[], dict[str, Any]],
                    background: bool, log: Callable[[str], None]) -> ShardedStorage:
    """The storage of a sharded run. A background writer gets a gloo group of its own for DCP's collectives (made
    here, on every rank at once), so that they never interleave with training's on the default group."""
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401 - imported now (~0.1 s), not during the first save

    group = dist.new_group(backend="gloo") if background and dist.is_initialized() else None
    return ShardedStorage(directory, keep_last, keep_best, rank=rank, template=template, group=group, log=log)
