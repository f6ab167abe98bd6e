"""Checkpointing: the ``Checkpointer`` (when, what, resume, export) over a storage (today's single-file
format, ``FileStorage``), background writes, and safe loading of a checkpoint file."""

from launcher.errors import CheckpointError
from trainers.core.checkpoint.background import BackgroundSaver, snapshot
from trainers.core.checkpoint.checkpointer import FORMAT, Checkpointer, migrate
from trainers.core.checkpoint.storage import CheckpointManager, FileStorage, Storage, load_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "FORMAT", "migrate", "Storage", "FileStorage", "CheckpointManager",
           "BackgroundSaver", "snapshot", "load_checkpoint"]
