"""Watch served libraries for added, replaced or removed experts, and ask for a reload.

A library add or remove ends with a commit to ``index.sqlite`` (in WAL mode the write
lands in ``index.sqlite-wal`` first) and a rename inside ``experts/``; the watcher
polls the size and modification time of those three paths every ``interval_s``
seconds and, when any changed, calls ``reload(wait=False)``. The reload itself
(between two batches, on the engine's thread) compares each expert's checksum, so a
touch that changed nothing costs one index read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from lorashelf.library import Library

WATCHED = ("index.sqlite", "index.sqlite-wal", "experts")


def fingerprint(root: Path) -> tuple:
    """(size, mtime_ns) of each watched path of a library (None where it is absent)."""
    out = []
    for name in WATCHED:
        try:
            st = (root / name).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


class LibraryWatcher:
    """A daemon thread calling ``reload(wait=False)`` when a library's index changes."""

    def __init__(
        self, libraries: Iterable[Library], reload: Callable[..., None], interval_s: float
    ) -> None:
        self.roots = [Path(lib.path) for lib in libraries]
        self.reload = reload
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = [fingerprint(r) for r in self.roots]

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorashelf-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> bool:
        """Check once; True (and a reload asked for) if any library changed."""
        now = [fingerprint(r) for r in self.roots]
        changed = now != self._seen
        self._seen = now
        if changed:
            self.reload(wait=False)
        return changed

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
