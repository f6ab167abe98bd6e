"""The one owner of checkpointing: when a save is due, what a checkpoint holds, where it goes (a storage),
how a run resumes from it, and the final ``model.pt``.

    checkpointer = Checkpointer(cfg.checkpoint, rt, run_dir, registry, rank_state, config, log)
    resumed = checkpointer.resume()                       # Path of the checkpoint, or None for a new run
    checkpointer.maybe_save(step, epochs_done=..., metric=...)   # every rank, at step and epoch boundaries
    checkpointer.save(step, final=True, metric=...)
    checkpointer.export_model(model)

What a checkpoint holds: the registry's objects (model, optimizer, schedule, scaler, training position,
the task's own state), every rank's own state (random streams, unlogged loss window), the resolved config
and a format version. Every method runs on every rank in the same order; only the storage's writer
ranks touch files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from launcher.config import ConfigError, to_dict
from launcher.errors import CheckpointError, UserError
from launcher.runtime import Runtime
from trainers.core.checkpoint.background import BackgroundSaver
from trainers.core.checkpoint.sharded import SHARDED_KEYS, ShardedStorage, is_sharded_checkpoint, sharded_storage
from trainers.core.checkpoint.storage import FileStorage, Storage, load_checkpoint
from trainers.core.config import CheckpointConfig
from trainers.core.files import atomic_write
from trainers.core.nonfinite import Diverged
from trainers.core.parallel import strip_prefixes
from trainers.core.sharding import full_state_dict, is_sharded
from trainers.core.sinks import count
from trainers.core.state import Registry

__all__ = ["Checkpointer", "FORMAT", "migrate"]

class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, ...); every rank stops, the earlier checkpoints are intact."""

    same_on_every_rank = True
    raised_by_every_rank = True


#: Version of what a checkpoint holds. 0: before the registry (seed and batch size at the top level);
#: 1: the registry, per-rank ``window``/``window_steps``; 2: per-rank state as a registry of its own.
FORMAT = 2


def _from_0(state: dict[str, Any]) -> dict[str, Any]:
    train = {**state["train_state"], "seed": state.pop("sampler_seed"), "global_batch_size": state.pop("global_batch_size")}
    return {**state, "train_state": train}


def _from_1(state: dict[str, Any]) -> dict[str, Any]:
    ranks = [{"rng": r["rng"], "losses": {"sum": r["window"], "steps": r["window_steps"]}} for r in state["ranks"]]
    return {**state, "ranks": ranks}


#: format -> the migration to the next format.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_0, 1: _from_1}


def format_of(state: dict[str, Any]) -> int:
    if "format" in state:
        return int(state["format"])
    return 0 if "sampler_seed" in state else 1


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of any earlier format in today's form (one migration per format, applied in order)."""
    version = format_of(state)
    if version > FORMAT:
        raise CheckpointError(f"The checkpoint has format {version}, newer than this toolkit's {FORMAT}: it was written "
                          "by a newer version. Update the toolkit, or start fresh with checkpoint.resume=never.")
    while version < FORMAT:
        state = _MIGRATIONS[version](state)
        version += 1
    return {**state, "format": FORMAT}


class Checkpointer:
    """Saves, resumes and exports for one rank of a run (see the module docstring)."""

    def __init__(self, cfg: CheckpointConfig, rt: Runtime, run_dir: Path, registry: Registry, rank_state: Registry,
                 config: Any, log: Callable[[str], None], prepare: Callable[[], None] = lambda: None,
                 check: Callable[[], str | None] = lambda: None, storage: Storage | None = None,
                 sharded: bool = False) -> None:
        self.cfg, self.rt, self.run_dir = cfg, rt, run_dir
        self.registry, self.rank_state = registry, rank_state
        self.config_record = to_dict(config)  # built once: OmegaConf takes ~10 ms per call
        self.log = log
        self.prepare = prepare  # every rank, before a save: e.g. make rank 0's buffers everyone's
        self.check = check  # every rank, before a save: what is wrong with the state (non-finite weights), or None
        self.storage = storage or self._storage(sharded)
        self.writer = BackgroundSaver(self.storage) if cfg.async_ else None
        self.saved_at = time.monotonic()
        self.resumed_world_size: int | None = None  # the world size that wrote the checkpoint resumed from

    def _storage(self, sharded: bool) -> Storage:
        """Single files written by rank 0, or (``sharded``) folders of DCP shards written by every rank."""
        folder = self.run_dir / "checkpoints"
        if not sharded:
            return FileStorage(folder, self.cfg.keep_last, self.cfg.keep_best, log=self.log)
        objects = self.registry.objects
        return sharded_storage(folder, self.cfg.keep_last, self.cfg.keep_best, self.rt.rank,
                               lambda: {k: objects[k].state_dict() for k in SHARDED_KEYS}, self.cfg.async_, self.log)

    # ----------------------------------------------------------------------------------- when
    def due(self, step: int, epochs_done: int | None = None, idle_s: float | None = None) -> bool:
        """Whether a periodic checkpoint is due: at an epoch's end (``epochs_done`` epochs finished) by
        ``checkpoint.every_epochs``, at any step by ``checkpoint.every_steps``, and by
        ``checkpoint.every_minutes`` when ``idle_s`` (seconds since the last save, agreed by all ranks) says so."""
        c = self.cfg
        by_epoch = epochs_done is not None and c.every_epochs > 0 and epochs_done % c.every_epochs == 0
        by_time = c.every_minutes > 0 and idle_s is not None and idle_s >= 60 * c.every_minutes
        return by_epoch or by_time or (c.every_steps > 0 and step % c.every_steps == 0)

    def maybe_save(self, step: int, *, epochs_done: int | None = None, idle_s: float | None = None,
                   metric: float | None = None) -> None:
        if self.due(step, epochs_done, idle_s):
            self.save(step, metric)

    def idle_s(self) -> float:
        """Seconds since this rank's last save (or since the run started here)."""
        return time.monotonic() - self.saved_at

    def last_good(self) -> Path | None:
        """The newest checkpoint on disk (every one of them was checked finite before it was written)."""
        return self.storage.latest_path()

    # ----------------------------------------------------------------------------------- save
    def save(self, step: int, metric: float | None = None, *, final: bool = False, wait: bool = False) -> None:
        """Checkpoint the current state (every rank calls it; the storage's writers write).

        With checkpoint.async, a periodic checkpoint is written in the background; the final one and the
        stop checkpoint (``wait``) are on disk before this returns."""
        self.prepare()
        gathered = self.rt.gather_objects((self.check(), self.rank_state.state_dict()), "checkpoint")
        problem = next((problem for problem, _ in gathered if problem), None)
        if problem:  # on every rank alike: nothing is written from a broken state
            raise Diverged(problem, step, self.last_good())
        failure = None
        if self.rt.is_main or self.storage.writes_on_every_rank:
            try:
                self._write([state for _, state in gathered], step, metric, final=final, wait=wait)
            except OSError as e:  # a full disk, a lost file system: the files written before are intact
                failure = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        # Instead of a barrier: every rank learns how the write went, and all stop together if it failed.
        failure = next((f for f in self.rt.gather_objects(failure, "checkpoint") if f), None)
        if failure:
            raise CheckpointWriteError(
                f"Could not write the checkpoint of step {step} ({failure}). The checkpoints written before are "
                f"intact (the newest: {self.last_good() or 'none yet'}): free space or give another run.dir, then run "
                "the same command again to resume.")
        self.saved_at = time.monotonic()

    def _write(self, ranks: list[Any], step: int, metric: float | None, *, final: bool, wait: bool) -> None:
        state = {**self.registry.state_dict(), "ranks": ranks, "world_size": self.rt.world_size,
                 "config": self.config_record, "format": FORMAT}
        background = self.writer is not None and not (final or wait)
        if self.writer is not None and not background:
            self.writer.wait()
        path = (self.writer.save if background and self.writer else self.storage.save)(state, step, metric)
        note = " (final)" if final else " (writing in the background)" if background else ""
        self.log(f"checkpoint {path.name}{note}")

    def export_model(self, model: nn.Module, replace: bool = True) -> Path:
        """The final weights alone, as ``model.pt`` (plain keys, whole tensors, written atomically), for inference
        and fine-tuning; an existing one is kept unless ``replace``. Every rank calls it (a sharded model is
        gathered to rank 0)."""
        path = self.run_dir / "model.pt"
        if not replace and path.exists():
            return path
        weights = full_state_dict(model) if is_sharded(model) else None
        if self.rt.is_main:
            plain = strip_prefixes(weights if weights is not None else model.state_dict())
            atomic_write(path, lambda f: torch.save(plain, f))
        return path

    def best_entry(self) -> dict[str, Any] | None:
        """The manifest entry (file, step, metric) of the best checkpoint, when ``checkpoint.keep_best``."""
        return self.storage.best_entry() if self.cfg.keep_best else None

    def close(self) -> None:
        """A checkpoint still being written when the run ends (an error, an interrupt) is completed."""
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as e:  # noqa: BLE001 - the run is already ending; its own error matters more
                self.log(f"checkpoint: the background write failed: {e}")

    # ----------------------------------------------------------------------------------- resume
    def resume(self) -> Path | None:
        """Continue from a checkpoint as checkpoint.resume says (auto, never, or a path); returns its path,
        or None for a new run."""
        choice = self.cfg.resume
        if choice == "never" and self.storage.list():
            raise ConfigError(
                f"checkpoint.resume=never but {self.run_dir / 'checkpoints'} already holds checkpoints, which a fresh "
                "run would overwrite and prune. Choose a new run.dir, or resume with checkpoint.resume=auto.")
        found = None
        if choice == "auto":
            self._check_format()
            found = self.storage.load_latest(map_location="cpu")
        elif choice != "never":
            found = self._load_given(Path(choice)), Path(choice)
        if found is None:
            return None
        state = migrate(found[0])
        self.registry.load_state_dict(state)
        self._restore_ranks(state["ranks"])
        self.resumed_world_size = int(state.get("world_size", len(state["ranks"])))
        return found[1]

    def moved(self) -> str:
        """A sentence when the checkpoint resumed from was written at another world size, else ''."""
        saved_by, ranks = self.resumed_world_size, self.rt.world_size
        if saved_by in (None, ranks):
            return ""
        return f" Resumed at {count(ranks, 'rank')} from a checkpoint written by {saved_by}."

    def _load_given(self, path: Path) -> dict[str, Any]:
        sharded = isinstance(self.storage, ShardedStorage)
        if sharded != is_sharded_checkpoint(path):
            raise CheckpointError(
                f"checkpoint.resume={path} is a {'sharded folder' if not sharded else 'single-file checkpoint'}, but "
                f"this run writes {'sharded folders' if sharded else 'single files'} (dist.strategy="
                f"{'fsdp' if sharded else 'ddp'}). Resume it with the strategy that wrote it, or convert it with "
                f"`python -m launcher export` and start from the weights with model.init_from=PATH.")
        if isinstance(self.storage, ShardedStorage):
            return self.storage.load(path)
        return load_checkpoint(path, map_location="cpu")

    def _check_format(self) -> None:
        """Checkpoints of the other strategy in this run's folder: an error, not a fresh start on top of them."""
        folder = self.run_dir / "checkpoints"
        if self.storage.list() or not folder.is_dir():
            return
        other = (list(folder.glob("step-*.pt")) if isinstance(self.storage, ShardedStorage)
                 else [p for p in folder.glob("step-*") if is_sharded_checkpoint(p)])
        if other:
            wrote, now = ("ddp", "fsdp") if isinstance(self.storage, ShardedStorage) else ("fsdp", "ddp")
            raise ConfigError(
                f"{folder} holds checkpoints written with dist.strategy={wrote} ({other[0].name}, ...), but this run "
                f"has dist.strategy={now}. Set dist.strategy={wrote} to resume it, or give a new run.dir (its weights "
                f"can seed the new run: python -m launcher export {self.run_dir}, then model.init_from=PATH).")

    def _restore_ranks(self, ranks: list[dict[str, Any]]) -> None:
        if len(ranks) == self.rt.world_size:
            self.rank_state.load_state_dict(ranks[self.rt.rank])
            return
        # Saved at another world size: each per-rank object makes what it can of all ranks' states.
        for name, obj in self.rank_state.objects.items():
            obj.load_other_world([r[name] for r in ranks])  # type: ignore[attr-defined]
