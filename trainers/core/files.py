"""Files that are whole or absent: write to a temporary file, fsync, rename into place, fsync the folder.

A reader (or a resumed run after a crash) sees the old content or the new one, never a mix, and a failed
write (disk full, an unpicklable object) leaves no debris under the real name.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["TMP_MARK", "fsync_dir", "atomic_write", "atomic_write_text"]

# Temp files start with "." and carry ".tmp-": never matched by a real name, easy to find after a crash.
TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename/create/delete inside directory ``path`` durable (no-op where unsupported)."""
    if os.name == "nt":  # Windows cannot open a directory; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some network/FUSE file systems reject fsync on directories; the data fsync already happened.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    # Same directory as the target: os.replace is only atomic within one file system.
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` via temp file + fsync + os.replace + directory fsync; never leaves it half-written."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save (disk full, unpicklable state) leaves no debris
        raise
    fsync_dir(path.parent)  # the rename itself must survive a power loss


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: readers see the old or the new content, never a mix."""
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))
