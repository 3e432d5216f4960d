"""Opening a library's files: ``library.json`` created or checked, the index read.

Readers never write (a read-only library directory must work): a missing, stale or
damaged index is replaced by an in-memory one matched against the expert dirs, and
only a writer, under the lock, repairs the file (lorashelf.library.recover).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.errors import LorashelfError
from lorashelf.library import recover
from lorashelf.library.fsutil import fsync_dir
from lorashelf.library.index import Index
from lorashelf.library.recover import EXPERTS, TMP
from lorashelf.library.schema import (
    LIBRARY_FILE,
    new_library_meta,
    utc_now,
)
from lorashelf.library.shapes import (
    FROM_BASE,
    SHAPES_KEY,
    SOURCE_KEY,
    shapes_from_base_config,
)

log = logging.getLogger("lorashelf.library")
INDEX_FILE = "index.sqlite"


def _create(
    root: Path,
    base_model: str | None,
    target_modules: list[str] | None,
    rank: int | None,
    allow_mixed: bool,
    base_config: str | os.PathLike[str] | None,
) -> None:
    from lorashelf.models import canonical_id

    if not base_model:
        raise LorashelfError(
            f"creating a library at {root} needs its base model: pass base_model= "
            "(`lorashelf library init DIR --base MODEL`)"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorashelfError(f"a library's LoRA rank must be a positive integer, not {rank!r}")
    if target_modules is not None and not all(isinstance(t, str) and t for t in target_modules):
        raise LorashelfError(f"target modules must be module names, not {target_modules!r}")
    config = base_config if base_config is not None else base_model
    shapes = shapes_from_base_config(Path(config)) if Path(config).exists() else None
    (root / EXPERTS).mkdir(parents=True, exist_ok=True)
    (root / TMP).mkdir(exist_ok=True)
    meta = new_library_meta(
        canonical_id(base_model), target_modules=target_modules, rank=rank, allow_mixed=allow_mixed
    )
    if shapes is not None:
        meta.update({SHAPES_KEY: shapes, SOURCE_KEY: FROM_BASE})
    tmp = root / f".{LIBRARY_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
    write_json_atomic(tmp, meta)
    try:
        os.link(tmp, root / LIBRARY_FILE)  # fails if another process created it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    _open_index_file(root).close()
    fsync_dir(root)


def _check_matches(
    root: Path, meta: Mapping[str, Any], base_model: str | None, target_modules: list[str] | None
) -> None:
    if base_model is not None:
        from lorashelf.models import same_base

        if not same_base(base_model, meta["base_model"]):
            raise LorashelfError(
                f"library {root} is for base model {meta['base_model']!r}, not {base_model!r}; "
                "use another directory for that base"
            )
    have = meta.get("target_modules")
    if target_modules and have and sorted(target_modules) != have:
        raise LorashelfError(
            f"library {root} targets {','.join(have)}, not {','.join(sorted(target_modules))}"
        )


def _writable(root: Path) -> bool:
    return os.access(root, os.W_OK) and os.access(root / EXPERTS, os.W_OK)


def _read_index(root: Path) -> tuple[Index, str | None]:
    """The index readers use, and why it is not ``index.sqlite`` as is (or None).

    ``index.sqlite`` opened read-only when it is sound and matches the expert dirs;
    otherwise an in-memory index reconciled with them (from the file's rows when they
    are readable, so only changed experts are re-read). Nothing on disk changes.
    """
    path = root / INDEX_FILE
    if not path.exists():
        problem = f"{INDEX_FILE} is missing" if recover.disk_experts(root) else None
        return _in_memory(root, None), problem
    index = Index(path, readonly=True)
    try:
        if not index.schema_ok():
            index.close()
            return _in_memory(root, None), f"{INDEX_FILE} is from another lorashelf version"
        if (qc := index.quick_check()) != "ok":
            raise sqlite3.DatabaseError(qc.splitlines()[0])
        if not recover.index_matches(root, index):
            mem = index.copy_to_memory()
            index.close()
            return _in_memory(root, mem), None  # a writer's next open writes it back
    except sqlite3.DatabaseError as e:
        index.close()
        log.warning("library %s: %s is damaged (%s); reading the expert dirs", root, INDEX_FILE, e)
        return _in_memory(root, None), f"{INDEX_FILE} is damaged ({e})"
    return index, None


def _in_memory(root: Path, index: Index | None) -> Index:
    index = index or Index(None)
    repair = recover.Repair()
    with index.write():
        recover.reconcile(root, index, repair, in_memory=True)
    recover.log_skipped(root, repair)
    return index


def _open_index_file(root: Path) -> Index:
    """``index.sqlite`` for writing; a damaged one is moved aside first, so the
    caller's reconcile refills a fresh one from the expert dirs."""
    path = root / INDEX_FILE
    index = Index(path)
    try:
        if not path.exists() or index.quick_check() == "ok":
            return index  # a sound file is never replaced: other writers may hold it open
    except sqlite3.DatabaseError:
        pass
    index.close()
    aside = path.with_name(f"{INDEX_FILE}.corrupt-{utc_now().replace(':', '')}")
    os.replace(path, aside)
    log.warning("library %s: %s was damaged; moved to %s", root, INDEX_FILE, aside.name)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    index = Index(path)
    index.conn  # noqa: B018 - connect now
    return index
