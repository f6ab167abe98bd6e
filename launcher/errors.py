"""The one base class of errors a user can fix (config, launch environment, data, checkpoint).

Every entry point maps a ``UserError`` to its one-paragraph message on stderr and exit status
``USAGE_EXIT_CODE``, with no traceback: the message itself says what is wrong and what to do.
"""

from __future__ import annotations

#: Exit status for bad input (config, launch environment, dataset, checkpoint): fix and re-run.
USAGE_EXIT_CODE = 2


class UserError(Exception):
    """Bad input that the user can fix; ``str(error)`` names the problem and the fix."""


class DatasetUnavailable(UserError):
    """A dataset is missing or unreadable and could not be fetched; the message names the fix."""
