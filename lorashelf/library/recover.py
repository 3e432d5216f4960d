"""Check a library and bring it back to a consistent state after a crash.

The expert directories are the truth. A writer killed mid-add leaves at most a staging
dir in ``.tmp`` (deleted once no live writer holds its lock), or a complete expert dir
with no index row (indexed from its card). A writer killed mid-overwrite may have moved
the old expert to ``.tmp/replaced--<name>--<id>`` without moving the new one in: the
old one is put back (the index row still names its inode, so the overwrite never
committed). A writer killed mid-remove leaves an index row without a dir,
which is dropped. Rows whose dir's inode changed are re-read from disk. Callers hold
the index's write lock, so no live writer is between its two renames meanwhile.
:func:`find_problems` is ``Library.verify``: every checksum, every dir, every row.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError
from lorashelf.library.adapter import modules_from_header
from lorashelf.library.expert import Expert, Problem
from lorashelf.library.factors import WEIGHTS_FILE
from lorashelf.library.fsutil import remove_if_dead, remove_tree
from lorashelf.library.index import Index, expert_row
from lorashelf.library.schema import CARD_FILE

log = logging.getLogger("lorashelf.library")

EXPERTS = "experts"
TMP = ".tmp"
REPLACED = "replaced--"
REMOVED = "removed--"


@dataclass
class Repair:
    """What a reconciliation changed in the index."""

    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # dir name -> why it is no expert
    restored: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.dropped or self.refreshed or self.skipped or self.restored)

    def summary(self) -> str:
        parts = [
            f"{len(v)} {k}"
            for k, v in (
                ("indexed", self.added),
                ("dropped", self.dropped),
                ("re-read", self.refreshed),
                ("restored", self.restored),
                ("skipped", self.skipped),
            )
            if v
        ]
        return ", ".join(parts)


def displaced_path(root: Path, kind: str, name: str) -> Path:
    """Where an expert dir goes while an overwrite (REPLACED) or remove (REMOVED) commits."""
    return root / TMP / f"{kind}{name}--{os.urandom(8).hex()}"


def displaced_name(entry: Path, kind: str) -> str:
    return entry.name[len(kind) :].rsplit("--", 1)[0]


def disk_experts(root: Path) -> dict[str, int]:
    """``{dir name: inode}`` of the expert dirs (one scandir, no stat on Linux)."""
    try:
        entries = list(os.scandir(root / EXPERTS))
    except FileNotFoundError:
        return {}
    return {
        e.name: e.inode()
        for e in entries
        if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
    }


def tmp_entries(root: Path) -> list[Path]:
    try:
        return sorted((root / TMP).iterdir())
    except FileNotFoundError:
        return []


def needs_repair(root: Path, index: Index) -> bool:
    """A cheap check (no lock, no card read) for leftovers or an index/disk mismatch."""
    return bool(tmp_entries(root)) or not index_matches(root, index)


def index_matches(root: Path, index: Index) -> bool:
    """The index rows name exactly the expert dirs, with their inodes (no card read)."""
    return disk_experts(root) == index.inodes()


def row_from_disk(root: Path, name: str, inode: int | None) -> dict[str, Any]:
    """The index row of the expert dir ``experts/<name>``, read from its card and header."""
    path = root / EXPERTS / name
    try:
        card = json.loads((path / CARD_FILE).read_text())
    except FileNotFoundError:
        raise LorashelfError(f"{path} has no {CARD_FILE}; it is not a lorashelf expert") from None
    except ValueError as e:
        raise LorashelfError(f"{path / CARD_FILE} is unreadable ({e})") from None
    if not isinstance(card, dict) or card.get("name") != name:
        raise LorashelfError(f"{path / CARD_FILE} names another expert ({card.get('name')!r})")
    modules = modules_from_header(path / WEIGHTS_FILE, f"expert {name!r}")
    return expert_row(card, modules, inode)


def displaced_experts(root: Path, rows: dict[str, int | None]) -> dict[str, Path]:
    """``{name: .tmp/replaced--...}`` for overwrites that never committed (see clean_tmp)."""
    out = {}
    for entry in tmp_entries(root):
        if entry.name.startswith(REPLACED):
            name = displaced_name(entry, REPLACED)
            if not (root / EXPERTS / name).exists() and rows.get(name) == entry.stat().st_ino:
                out[name] = entry
    return out


def clean_tmp(root: Path, index: Index, repair: Repair) -> None:
    """Delete dead writers' leftovers in ``.tmp``; put back an expert a crash displaced.

    A ``replaced--`` dir goes back only if its name is free and the index still points
    at it (same inode): then the overwrite that moved it never committed. Otherwise the
    overwrite committed (or the expert was removed since) and it is garbage.
    """
    rows = None
    for entry in tmp_entries(root):
        if entry.name.startswith(REPLACED):
            name = displaced_name(entry, REPLACED)
            dest = root / EXPERTS / name
            rows = index.inodes() if rows is None else rows
            if not dest.exists() and rows.get(name) == entry.stat().st_ino:
                os.rename(entry, dest)
                repair.restored.append(name)
                continue
            remove_tree(entry)
        elif entry.name.startswith(REMOVED):
            remove_tree(entry)
        else:
            remove_if_dead(entry)


def reconcile(root: Path, index: Index, repair: Repair, *, in_memory: bool = False) -> None:
    """Make the index rows match the expert dirs (by name and inode).

    ``in_memory`` (a reader's copy; nothing on disk may change): an expert that a
    crashed overwrite left displaced in ``.tmp`` stays listed, read from where it lies.
    """
    disk = disk_experts(root)
    rows = index.inodes()
    if in_memory:
        for name, path in displaced_experts(root, rows).items():
            row = index.row(name)
            if row is not None:
                index.upsert(row | {"path": str(path.relative_to(root))})
                rows.pop(name)
    for name in sorted(rows.keys() - disk.keys()):
        index.delete(name)
        repair.dropped.append(name)
    for name, inode in sorted(disk.items()):
        if name in rows and rows[name] == inode:
            continue
        try:
            row = row_from_disk(root, name, inode)
        except (LorashelfError, OSError, ValueError, KeyError) as e:
            repair.skipped[name] = str(e)
            if name in rows:
                index.delete(name)
            continue
        index.upsert(row)
        (repair.refreshed if name in rows else repair.added).append(name)


def repair_library(root: Path, index: Index, *, clean: bool = True) -> Repair:
    """Clean ``.tmp`` (when ``clean``) and reconcile, holding the write lock; log changes."""
    repair = Repair()
    with index.write():
        if clean:
            clean_tmp(root, index, repair)
        reconcile(root, index, repair)
    if repair:
        log.warning(
            "library %s: index reconciled with the expert dirs (%s)", root, repair.summary()
        )
    log_skipped(root, repair)
    return repair


def log_skipped(root: Path, repair: Repair) -> None:
    for name, why in sorted(repair.skipped.items()):
        log.warning("library %s: experts/%s is not a valid expert: %s", root, name, why)


def rebuild(root: Path, index: Index) -> None:
    """Drop every index row and re-read all expert dirs."""
    repair = Repair()
    with index.write():
        clean_tmp(root, index, repair)
        index.clear()
        reconcile(root, index, repair)
    log_skipped(root, repair)


def find_problems(
    root: Path, index: Index, base_model: str, *, progress: bool = False
) -> list[Problem]:
    """Corrupt or missing files, invalid expert dirs and index/disk mismatches."""
    problems = []
    if index.path is not None and (qc := index.quick_check()) != "ok":
        problems.append(Problem("index", None, f"{index.path.name}: {qc}; delete it to rebuild"))
    disk = disk_experts(root)
    rows = index.inodes()
    for name in sorted(disk.keys() - rows.keys()):
        try:
            row_from_disk(root, name, disk[name])
            why = "has no index row; `lorashelf library verify --repair` indexes it"
        except (LorashelfError, OSError, ValueError, KeyError) as e:
            why = f"is not a valid expert ({e}); remove experts/{name}"
        problems.append(Problem("invalid", name, why))
    all_rows = index.select()
    # a reader's copy lists an expert a crashed overwrite displaced at its .tmp path
    displaced = {r["name"] for r in all_rows if r["path"] != f"{EXPERTS}/{r['name']}"}
    for name in sorted(rows.keys() - disk.keys() - displaced):
        problems.append(Problem("missing", name, f"is indexed but experts/{name} is missing"))
    experts = [Expert(root, r) for r in all_rows if r["name"] in disk or r["name"] in displaced]
    if progress:
        from tqdm import tqdm

        experts = tqdm(experts, desc="verify", unit="expert")
    for expert in experts:
        problems.extend(expert.verify())
        if str(expert.card.get("base_model", "")).lower() != base_model.lower():
            msg = f"card base_model {expert.card.get('base_model')!r} is not {base_model!r}"
            problems.append(Problem("invalid", expert.name, msg))
    return problems
