"""Checkpoints written in a background thread (``checkpoint.async=true``): training waits only for a copy of
the state in host memory."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import torch

from trainers.core.checkpoint.storage import Storage

__all__ = ["snapshot", "BackgroundSaver"]


def snapshot(value: Any) -> Any:
    """A copy of ``value`` whose tensors live in host memory and no longer share storage with the live
    state, so that training may go on changing parameters and optimizer buffers while it is written."""
    if hasattr(value, "to_local") and hasattr(value, "device_mesh"):  # a shard (DTensor): copy the local part only
        return _copy_shard(value)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


def _copy_shard(value: Any) -> Any:
    """A DTensor rebuilt around a host copy of its local shard: the same layout, without DTensor's dispatch (which
    costs far more than the copy for small shards)."""
    from torch.distributed.tensor import DTensor

    local = value.to_local().detach().to("cpu", copy=True)
    return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                              stride=value.stride())


class BackgroundSaver:
    """Writes checkpoints through a storage in one background thread, one at a time.

    ``save`` returns once the state is copied to host memory; the file, ``latest`` and the manifest are
    written by the thread with the storage's usual atomic discipline. A second ``save`` (and ``wait``)
    first waits for the one in flight, and re-raises its error, so checkpoints land in order and a failed
    write is never silent.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        self.wait()
        copied = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(copied, step, metric), name="checkpoint-writer",
                                        daemon=False)  # not a daemon: the interpreter finishes the write on exit
        self._thread.start()
        return self.storage.path_of(step)

    def _write(self, state: dict[str, Any], step: int, metric: float | None) -> None:
        try:
            self.storage.save(state, step, metric)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
