"""The library's SQLite index: one row per expert, for listing and filtering fast.

The expert directories are the truth; the index is a cache of their cards that can be
rebuilt from them at any time. It lives in ``DIR/index.sqlite`` in WAL mode (readers
never block the writer) with a busy timeout, so several processes can add experts at
once: each takes SQLite's write lock (``BEGIN IMMEDIATE``) only for the short commit of
an add or remove, and that lock doubles as the library's writer mutex. Each row
remembers the inode of its expert directory, so a directory replaced behind the
index's back is noticed on open without reading any card. Readers open the file
read-only (``mode=ro``; ``immutable=1`` on read-only media) and never change it; when
it is missing, damaged or stale they read an in-memory copy reconciled with the dirs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1"
COLUMNS = (
    "name",
    "tasks",
    "source",
    "base_model",
    "rank",
    "ranks",
    "target_modules",
    "files",
    "created",
    "path",
    "inode",
    "card",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY,
    tasks TEXT NOT NULL,
    source TEXT,
    base_model TEXT,
    rank INTEGER,
    ranks TEXT NOT NULL,
    target_modules TEXT NOT NULL,
    files TEXT NOT NULL,
    created TEXT,
    path TEXT NOT NULL,
    inode INTEGER,
    card TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS experts_name_nocase ON experts (name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def expert_row(
    card: Mapping[str, Any], modules: Mapping[str, tuple[int, int, int]], inode: int | None
) -> dict[str, Any]:
    """The index row of an expert from its card and its ``{module: (r, d_in, d_out)}``."""
    ranks = sorted({r for r, _, _ in modules.values()})
    return {
        "name": card["name"],
        "tasks": json.dumps(card.get("tasks", [])),
        "source": card.get("source"),
        "base_model": card.get("base_model"),
        "rank": ranks[0] if len(ranks) == 1 else None,
        "ranks": json.dumps(ranks),
        "target_modules": json.dumps(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        "files": json.dumps(card.get("files", {}), sort_keys=True),
        "created": card.get("created"),
        "path": f"experts/{card['name']}",
        "inode": inode,
        "card": json.dumps(card),
    }


class Index:
    """A connection to the index with the few queries the store needs."""

    def __init__(
        self, path: Path | None, busy_timeout_s: float = 120.0, *, readonly: bool = False
    ) -> None:
        self.path = path  # None: in memory
        self.readonly = readonly or path is None
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None or self._pid != os.getpid():  # never share one across fork
                self._conn = self._connect()
                self._pid = os.getpid()
            return self._conn

    @property
    def on_disk(self) -> bool:
        """True for the library's index file opened for writing."""
        return self.path is not None and not self.readonly

    def _connect(self) -> sqlite3.Connection:
        if self.path is None:
            target, uri = ":memory:", False
        elif self.readonly:
            # immutable: no -shm/-wal is created, so read-only media work too
            mode = "mode=ro" if os.access(self.path.parent, os.W_OK) else "immutable=1"
            target, uri = f"{self.path.resolve().as_uri()}?{mode}", True
        else:
            target, uri = str(self.path), False
        conn = sqlite3.connect(
            target,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            uri=uri,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        if self.path is not None and self.readonly:
            return conn  # the caller checks the schema version (schema_ok)
        if self.path is not None:
            conn.execute("PRAGMA journal_mode = WAL")
            # the index is rebuildable from the expert dirs, so WAL's NORMAL is enough
            conn.execute("PRAGMA synchronous = NORMAL")
        self._ensure_schema(conn)
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        try:  # the common case needs no lock
            if _schema_version(conn) == SCHEMA_VERSION:
                return
        except sqlite3.OperationalError:  # no tables yet
            pass
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)
            if _schema_version(conn) != SCHEMA_VERSION:  # new, or older: refilled from disk
                conn.execute("DELETE FROM experts")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            conn.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction; holding it excludes every other writer of the library."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def upsert(self, row: Mapping[str, Any]) -> None:
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        with self._lock:
            self.conn.execute(
                f"INSERT OR REPLACE INTO experts ({cols}) VALUES ({marks})",
                [row[c] for c in COLUMNS],
            )

    def delete(self, name: str) -> None:
        with self._lock:
            self.conn.execute("DELETE FROM experts WHERE name = ?", (name,))

    def clear(self) -> None:
        with self._lock:
            self.conn.execute("DELETE FROM experts")

    def row(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            got = self.conn.execute("SELECT * FROM experts WHERE name = ?", (name,)).fetchone()
        return dict(got) if got is not None else None

    def same_name_any_case(self, name: str) -> str | None:
        with self._lock:
            got = self.conn.execute(
                "SELECT name FROM experts WHERE name = ? COLLATE NOCASE", (name,)
            ).fetchone()
        return got[0] if got is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT name FROM experts ORDER BY name")]

    def count(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT count(*) FROM experts").fetchone()[0])

    def inodes(self) -> dict[str, int | None]:
        with self._lock:
            return dict(self.conn.execute("SELECT name, inode FROM experts").fetchall())

    def select(
        self,
        task: str | None = None,
        source: str | None = None,
        card_fields: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows (by name) whose tasks contain ``task``, of ``source``, with these card fields."""
        clauses, params = [], []
        if task is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(experts.tasks) WHERE value = ?)")
            params.append(task)
        if source is not None:
            clauses.append("source = ?")
            params.append(source)
        for key, value in (card_fields or {}).items():
            clause, extra = _field_clause(key, value)
            clauses.append(clause)
            params.extend(extra)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            cur = self.conn.execute(f"SELECT * FROM experts {where} ORDER BY name", params)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def schema_ok(self) -> bool:
        with self._lock:
            try:
                return _schema_version(self.conn) == SCHEMA_VERSION
            except sqlite3.OperationalError:
                return False

    def copy_to_memory(self) -> Index:
        """An in-memory index holding this one's rows (to reconcile without writing)."""
        mem = Index(None)
        with self._lock:
            self.conn.backup(mem.conn)
        return mem

    def quick_check(self) -> str:
        with self._lock:
            return str(self.conn.execute("PRAGMA quick_check").fetchone()[0])

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


def _schema_version(conn: sqlite3.Connection) -> str | None:
    got = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return got[0] if got is not None else None


def _field_clause(key: str, value: Any) -> tuple[str, list[Any]]:
    """SQL matching card field ``key`` against ``value`` (JSON semantics, exact types)."""
    path = '$."' + key.replace('"', "") + '"'
    if value is None:
        return "json_type(card, ?) = 'null'", [path]
    if isinstance(value, bool):
        return "json_type(card, ?) = ?", [path, "true" if value else "false"]
    if isinstance(value, (list, dict)):
        return "json_extract(card, ?) = json(?)", [path, json.dumps(value)]
    return "json_extract(card, ?) = ?", [path, value]
