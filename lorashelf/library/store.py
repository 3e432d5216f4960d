"""The library store: LoRA experts as PEFT dirs on disk, indexed in SQLite, written atomically.

Layout (readable without lorashelf)::

    DIR/library.json          format version, base model, target modules, rank policy
    DIR/experts/<name>/       adapter_config.json + adapter_model.safetensors + card.json
    DIR/index.sqlite          one row per expert (a rebuildable cache of the cards)
    DIR/.tmp/                 staging; dead writers' leftovers go at the next write

An add checks the adapter (nothing is written if it fails), stages its files in
``.tmp/<id>`` (fsynced), then, holding the index's write lock, moves the dir into
``experts/<name>`` with one ``os.rename`` and commits the index row last. A crash at
any point leaves the old state or the new one; :mod:`lorashelf.library.recover` puts
the index back in line at the next write (readers see a reconciled in-memory copy and
never write: a library on read-only media works). Reading is lazy: opening a library of 10,000
experts reads one SQLite file and lists one directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import derived, recover
from lorashelf.library.adapter import Adapter, apply_policy, check_base, read_adapter
from lorashelf.library.expert import Expert, Problem
from lorashelf.library.fsutil import fsync_dir, make_staging_dir, remove_tree, unlock_dir
from lorashelf.library.fsutil import write_new_file as _write
from lorashelf.library.index import Index, expert_row
from lorashelf.library.names import check_name, safe_name
from lorashelf.library.opening import (
    _check_matches,
    _create,
    _open_index_file,
    _read_index,
    _writable,
)
from lorashelf.library.recover import EXPERTS, REMOVED, REPLACED, TMP
from lorashelf.library.schema import (
    CARD_FIELDS,
    CARD_FILE,
    LIBRARY_FILE,
    check_caller_card,
    current_versions,
    make_card,
    read_library_meta,
    sha256_hex,
)
from lorashelf.library.shapes import (
    check_shapes,
    record_shapes,
)

log = logging.getLogger("lorashelf.library")


class Library:
    """A directory of LoRA experts for one base model. Make one with :meth:`open`."""

    def __init__(self, root: Path, meta: dict[str, Any], index: Index, *, fsync: bool) -> None:
        self.path = root
        self.meta = meta
        self._index = index
        self._fsync = fsync
        self.index_problem: str | None = None  # why reads do not come from index.sqlite
        self._versions: dict[str, str | None] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        create: bool = False,
        base_model: str | None = None,
        target_modules: list[str] | None = None,
        *,
        rank: int | None = None,
        allow_mixed: bool = False,
        fsync: bool = True,
        base_config: str | os.PathLike[str] | None = None,
    ) -> Library:
        """Open the library at ``path`` (``create=True`` makes it, given ``base_model``).

        ``base_model``/``target_modules`` given for an existing library must match it.
        ``fsync=False`` skips fsync calls (faster bulk writes, not power-cut safe).
        ``base_config`` (a transformers model dir or config.json) lets a new library
        record the base model's module shapes; a local ``base_model`` dir is used too.
        Opening never writes: the first write takes the write lock and repairs the index.
        """
        root = Path(path)
        if create and not (root / LIBRARY_FILE).exists():
            _create(root, base_model, target_modules, rank, allow_mixed, base_config)
        meta = read_library_meta(root)
        _check_matches(root, meta, base_model, target_modules)
        index, problem = _read_index(root)
        lib = cls(root, meta, index, fsync=fsync)
        lib.index_problem = problem
        return lib

    def _writer(self) -> None:
        """Before a write: the index file, opened for writing and reconciled on disk."""
        if not self._index.on_disk:
            self.repair()

    def repair(self) -> recover.Repair:
        """Take the write lock and bring the index file and ``.tmp`` in line with the
        expert dirs (what the first write does anyway); returns what changed."""
        self._require_writable()
        if not self._index.on_disk:
            self._index.close()
            self._index = _open_index_file(self.path)
            self.index_problem = None
        return recover.repair_library(self.path, self._index, clean=True)

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Library({str(self.path)!r}, base={self.base_model!r}, experts={len(self)})"

    @property
    def base_model(self) -> str:
        """The canonical id of the base model every expert was trained on."""
        return self.meta["base_model"]

    @property
    def target_modules(self) -> list[str] | None:
        return self.meta.get("target_modules")

    @property
    def rank(self) -> int | None:
        return self.meta["rank_policy"].get("rank")

    @property
    def allow_mixed(self) -> bool:
        return bool(self.meta["rank_policy"].get("allow_mixed"))

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._index.count()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._index.row(name) is not None

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.filter())

    def names(self) -> list[str]:
        return self._index.names()

    def get(self, name: str) -> Expert:
        row = self._index.row(name)
        if row is None:
            raise LorashelfError(
                f"no expert {name!r} in {self.path}{did_you_mean(name, self.names())}; "
                f"`lorashelf library ls {self.path}` lists them"
            )
        return Expert(self.path, row)

    def filter(
        self, task: str | None = None, source: str | None = None, **card_fields: Any
    ) -> list[Expert]:
        """Experts trained on ``task``, from ``source``, whose card fields equal these."""
        for key in card_fields:
            if key not in CARD_FIELDS:
                raise LorashelfError(
                    f"unknown card field {key!r}{did_you_mean(key, CARD_FIELDS)}; "
                    f"filter on one of: {', '.join(CARD_FIELDS)}"
                )
        rows = self._index.select(task=task, source=source, card_fields=card_fields)
        return [Expert(self.path, r) for r in rows]

    # ------------------------------------------------------------------ writing
    def add(
        self,
        src: str | os.PathLike[str],
        name: str | None = None,
        card: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        allow_mixed: bool = False,
        allow_base: bool = False,
    ) -> Expert:
        """Copy the PEFT adapter dir ``src`` into the library as expert ``name``.

        ``card`` fields (tasks, training, losses, source, ...) go into the card; the
        library fills base_model, files, versions (unless given) and created. Raises
        before writing anything if the adapter is not a plain, finite LoRA for this
        base model with the library's target modules and rank (unless ``allow_mixed``),
        whose module shapes fit the base model's. ``allow_base`` accepts an adapter that
        names another base model (its shapes are still checked).
        """
        self._writer()
        caller = check_caller_card(card or {})
        name = _pick_name(Path(src), name, caller)
        what = f"adapter {name!r}"
        adapter = read_adapter(Path(src), what)
        claimed = caller.get("base_model_exact") or caller.get("base_model")
        base_exact = check_base(
            adapter.base_model_exact, claimed, self.base_model, what, allow_base=allow_base
        )
        apply_policy(self.meta, adapter, what, allow_mixed)  # fail before staging anything
        check_shapes(self.meta, adapter.modules, what)
        if self._versions is None:
            self._versions = current_versions()
        files = {fn: sha256_hex(data) for fn, data in adapter.files.items()}
        full = make_card(
            caller, name=name, base_model=self.base_model, base_model_exact=base_exact,
            files=files, versions=self._versions,
        )  # fmt: skip
        (self.path / TMP).mkdir(exist_ok=True)
        staged, lock_fd = make_staging_dir(self.path / TMP)
        try:
            for fn, data in adapter.files.items():
                _write(staged / fn, data, fsync=self._fsync)
            card_bytes = (json.dumps(full, indent=2) + "\n").encode()
            _write(staged / CARD_FILE, card_bytes, fsync=self._fsync)
            if self._fsync:
                fsync_dir(staged)
            with self._index.write():
                old = self._commit_add(staged, full, adapter, overwrite, allow_mixed)
        finally:
            unlock_dir(lock_fd)
            if staged.exists():
                remove_tree(staged)
        if self._fsync:  # outside the lock: a crash before this is reconciled on open
            fsync_dir(self.path / EXPERTS)
            fsync_dir(self.path / TMP)
        if old is not None:
            remove_tree(old)
        return self.get(name)

    def _commit_add(
        self,
        staged: Path,
        card: dict[str, Any],
        adapter: Adapter,
        overwrite: bool,
        allow_mixed: bool,
    ) -> Path | None:
        """Under the write lock: policy, name clash, rename into place, index row."""
        name = card["name"]
        meta = read_library_meta(self.path)  # another process may have changed the policy
        new_meta = apply_policy(meta, adapter, f"adapter {name!r}", allow_mixed)
        check_shapes(meta, adapter.modules, f"adapter {name!r}")
        new_meta = record_shapes(new_meta, adapter.modules, name)
        dest = self.path / EXPERTS / name
        clash = self._index.same_name_any_case(name)
        if clash is not None and clash != name:
            raise LorashelfError(
                f"expert name {name!r} differs only in case from the existing {clash!r}, "
                "which clashes on case-insensitive filesystems; pick another name"
            )
        if (clash is not None or dest.exists()) and not overwrite:
            raise LorashelfError(
                f"an expert named {name!r} already exists in {self.path}; pick another name "
                "or pass overwrite=True (--overwrite) to replace it"
            )
        if new_meta != meta:  # before the expert lands, so no expert ever breaks the policy
            write_json_atomic(self.path / LIBRARY_FILE, new_meta)
        self.meta = new_meta
        old = None
        if dest.exists():
            old = recover.displaced_path(self.path, REPLACED, name)
            os.rename(dest, old)
        try:
            os.rename(staged, dest)
            self._index.upsert(expert_row(card, adapter.modules, dest.stat().st_ino))
        except BaseException:
            if dest.exists() and not staged.exists():
                os.rename(dest, staged)
            if old is not None:
                os.rename(old, dest)
            raise
        return old

    def remove(self, name: str) -> None:
        """Delete expert ``name``: its dir leaves ``experts/`` in one rename, then its row.

        The rename is the commit point: a crash after it leaves a row without a dir,
        which the next open drops (the expert is gone, as asked).
        """
        self._writer()
        trash = None
        with self._index.write():
            if self._index.row(name) is None:
                self.get(name)  # raises with suggestions
            dest = self.path / EXPERTS / name
            if dest.exists():
                trash = recover.displaced_path(self.path, REMOVED, name)
                (self.path / TMP).mkdir(exist_ok=True)
                os.rename(dest, trash)
                if self._fsync:
                    fsync_dir(dest.parent)
            try:
                self._index.delete(name)
            except BaseException:
                if trash is not None:
                    os.rename(trash, dest)
                raise
        if trash is not None:
            remove_tree(trash)

    def _require_writable(self) -> None:
        if not _writable(self.path):
            raise LorashelfError(f"library {self.path} is read-only here; copy it to change it")

    # ------------------------------------------------------------------ checking
    def verify(self, progress: bool = False) -> list[Problem]:
        """Every problem found: corrupt or missing files, index/disk mismatches,
        damaged derived files (Arrow prototypes, PHATGOOSE gates). Writes nothing."""
        problems = []
        if self.index_problem is not None:
            fix = f"`lorashelf library verify {self.path} --repair` rebuilds it"
            problems.append(Problem("index", None, f"{self.index_problem}; {fix}"))
        problems += recover.find_problems(
            self.path, self._index, self.base_model, progress=progress
        )
        return problems + derived.find_problems(self.path)

    def rebuild_index(self) -> int:
        """Rebuild the index from the expert dirs and drop damaged derived files (they
        are recomputed on use); returns the number of experts."""
        self._require_writable()
        self._index.close()
        self._index = _open_index_file(self.path)
        self.index_problem = None
        recover.rebuild(self.path, self._index)
        derived.remove_damaged(self.path)
        return len(self)

    @contextmanager
    def staging_dir(self, prefix: str = "work--") -> Iterator[Path]:
        """A scratch dir in ``.tmp`` for a writer's intermediate files (e.g. training).

        It holds an advisory lock while in use, so a writer killed by SIGKILL leaves a
        dir that the next write to the library deletes; it is deleted on exit.
        """
        self._writer()
        staged, lock_fd = make_staging_dir(self.path / TMP, prefix)
        try:
            yield staged
        finally:
            unlock_dir(lock_fd)
            remove_tree(staged)


def _pick_name(src: Path, name: str | None, caller: Mapping[str, Any]) -> str:
    card_name = caller.get("name")
    if name and card_name and name != card_name:
        raise LorashelfError(f"name {name!r} and card name {card_name!r} differ; give one")
    name = name or card_name
    if not name:
        tasks = caller.get("tasks") or []
        name = safe_name(tasks[0] if len(tasks) == 1 else src.resolve().name)
    return check_name(name)
