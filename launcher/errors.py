"""The one base class of errors a user can fix (config, launch environment, data, checkpoint).

Every entry point maps a ``UserError`` to its one-paragraph message on stderr and exit status
``USAGE_EXIT_CODE``, with no traceback: the message itself says what is wrong and what to do.
"""

from __future__ import annotations

#: Exit status for bad input (config, launch environment, dataset, checkpoint): fix and re-run.
USAGE_EXIT_CODE = 2


class UserError(Exception):
    """Bad input that the user can fix; ``str(error)`` names the problem and the fix."""

    #: True when every rank meets the same error (a bad key, a checkpoint they all read): then only
    #: rank 0 reports it. Otherwise each rank that fails reports it, prefixed with its rank.
    same_on_every_rank: bool = False


class DatasetUnavailable(UserError):
    """A dataset is missing or unreadable and could not be fetched; the message names the fix."""

    def __init__(self, message: str, same_on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was expected; the message names the files and the fix."""

    same_on_every_rank = True  # every rank reads the same files
