"""Durable, crash-safe file operations for the library store.

The store's only commit point on disk is ``os.rename`` of a complete directory, so an
expert appears whole or not at all (the classic write-temp-fsync-rename recipe). Files
are written with ``O_EXCL`` and fsynced, then their directory; after a rename both
parent directories are fsynced so the rename itself survives a power cut. A staging
directory being filled by a live writer holds an advisory ``flock``; a cleaner that
cannot take the lock leaves it alone, and the kernel drops the lock when the writer
dies (even by SIGKILL), so leftovers of dead writers are recognised at once. Where
``fcntl`` is missing (Windows), staging dirs younger than an hour count as live.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

STALE_SECONDS = 3600.0


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Create ``path`` (it must not exist) with ``data``, fsynced when asked."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _try_lock(path: Path) -> int | None:
    """An fd holding the advisory lock of directory ``path``, or None if another has it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def make_staging_dir(parent: Path, prefix: str = "new--") -> tuple[Path, int]:
    """A fresh directory under ``parent`` and the fd holding its lock (pass to unlock_dir).

    A cleaner may delete the directory between ``mkdir`` and the lock; after taking the
    lock we check the path still names the directory we locked, and retry if not.
    """
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex}"
        path.mkdir()
        if fcntl is None:  # pragma: no cover
            return path, -1
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock_dir(fd: int) -> None:
    if fd >= 0:
        os.close(fd)  # closing the last fd drops the flock


def remove_if_dead(path: Path) -> bool:
    """Delete the staging dir ``path`` unless a live writer holds it; True if deleted."""
    if fcntl is None:  # pragma: no cover
        try:
            if time.time() - path.stat().st_mtime < STALE_SECONDS:
                return False
        except FileNotFoundError:
            return False
        remove_tree(path)
        return True
    if not path.is_dir():
        remove_tree(path)
        return True
    try:
        fd = _try_lock(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if fd is None:
        return False
    try:
        remove_tree(path)  # while holding the lock, so a racing writer notices
    finally:
        os.close(fd)
    return True


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree; tolerant of a concurrent delete of the same tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
