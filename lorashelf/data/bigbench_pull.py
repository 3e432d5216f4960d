"""``pull_bigbench``: the official BIG-bench sdist -> task.json files + index.

The sdist ``bigbench-1.0.0.tar.gz`` (358 MB; 1.9 GB unpacked) is fetched without pip
(see :mod:`lorashelf.data.download`) into ``HOME/downloads`` and streamed once
(``tarfile`` mode ``r|gz``): only ``*/bigbench/benchmark_tasks/**/task.json`` members
are written, byte for byte, into a staging directory that is renamed into place when
complete, so a failed pull never leaves a half-extracted tree. ``only`` takes glob
patterns over task names (a container's pattern brings its subtasks along); tasks
pulled earlier stay. Member names are checked before anything is written, so an
archive cannot place files outside the staging directory.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from lorashelf.data.bigbench_index import Indexer
from lorashelf.data.bigbench_store import (
    bigbench_dir,
    check_name,
    index_path,
    read_index,
    tasks_dir,
)
from lorashelf.data.download import byte_bar, fetch, find_file, sha256_of
from lorashelf.errors import LorashelfError, did_you_mean

SDIST = "bigbench-1.0.0.tar.gz"
# PyPI files are immutable: a local copy with this hash needs no trip to the index.
KNOWN_SHA256 = {SDIST: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"}
MEMBER = re.compile(r"[^/]+/bigbench/benchmark_tasks/(.+)/(task\.json|task\.py)")


def pull_bigbench(
    home: Path,
    *,
    only: Sequence[str] | None = None,
    index_url: str = "https://pypi.org/simple",
    progress: bool = True,
    sdist: Path | None = None,
) -> Path:
    """Extract BIG-bench task.json files under ``HOME/data/bigbench``; return that dir.

    ``sdist`` is a local copy of the archive (no network); otherwise it is downloaded
    once to ``HOME/downloads`` (or reused from there when its sha256 checks out).
    """
    home = Path(home)
    if sdist is None:
        sdist = fetch_sdist(home, index_url, progress)
    elif not Path(sdist).is_file():
        raise LorashelfError(f"--sdist {sdist} does not exist; pass the path of {SDIST}")
    extract(Path(sdist), home, list(only) if only else None, progress)
    return bigbench_dir(home)


def fetch_sdist(home: Path, index_url: str, progress: bool) -> Path:
    dest = home / "downloads" / SDIST
    part = dest.with_name(dest.name + ".part")
    if dest.is_file() and not part.exists() and sha256_of(dest, progress) == KNOWN_SHA256[SDIST]:
        return dest
    return fetch(find_file(index_url, "bigbench", SDIST), dest, progress)


def selected(name: str, only: list[str] | None) -> bool:
    """``name`` or one of its parent tasks matches a pattern of ``only``."""
    if only is None:
        return True
    parts = name.split("/")
    names = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in only)


class _Counting:
    """A read-only file wrapper that reports bytes read to a progress bar."""

    def __init__(self, f: IO[bytes], bar: tqdm) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.bar.update(len(b))
        return b


def members(
    sdist: Path, want: Callable[[str], bool], progress: bool
) -> Iterator[tuple[str, str, bytes | None]]:
    """(task name, ``task.json`` or ``task.py``, bytes when ``want(name)``) per task file."""
    with (
        open(sdist, "rb") as f,
        byte_bar(f"reading {sdist.name}", sdist.stat().st_size, progress=progress) as bar,
    ):
        try:
            with tarfile.open(fileobj=_Counting(f, bar), mode="r|gz") as tf:
                for m in tf:
                    match = MEMBER.fullmatch(m.name)
                    if not (match and m.isfile()):
                        continue
                    name, kind = match.groups()
                    wanted = kind == "task.json" and want(name)
                    yield name, kind, tf.extractfile(m).read() if wanted else None  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise LorashelfError(
                f"{sdist} is not a readable tar.gz ({e}); delete it and pull again"
            ) from None


def stage(
    sdist: Path, staged: Path, only: list[str] | None, indexer: Indexer, progress: bool
) -> set[str]:
    """Write the selected task.json files under ``staged``; return their names."""
    seen: set[str] = set()
    written: set[str] = set()
    scripts: set[str] = set()
    for name, kind, data in members(sdist, lambda n: selected(n, only), progress):
        if kind == "task.py":
            scripts.add(name)
            continue
        seen.add(name)
        if data is None:
            continue
        check_name(name)
        dest = staged / name / "task.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        indexer.add(name, data)
        written.add(name)
    indexer.programmatic = scripts - seen
    missing = [p for p in only or [] if not any(selected(n, [p]) for n in seen)]
    if missing:
        raise LorashelfError(
            f"no BIG-bench task matches {missing[0]!r}{did_you_mean(missing[0], seen)}; "
            "patterns are globs over names like logical_deduction/three_objects"
        )
    return written


def carry_over(home: Path, staged: Path, written: set[str], indexer: Indexer) -> None:
    """Link tasks from an earlier pull that this pull did not rewrite into ``staged``."""
    old_root = tasks_dir(home)
    if not old_root.is_dir():
        return
    old_index = read_index(home) or {}
    kept = set()
    for path in old_root.rglob("task.json"):
        name = path.parent.relative_to(old_root).as_posix()
        if name in written:
            continue
        dest = staged / name / "task.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
        kept.add(name)
    # leaf rows are reused (parsing them again is the slow part); containers and
    # earlier failures are small or rare, so they are indexed afresh
    rows = {t["name"]: t for t in old_index.get("tasks", []) if "subtasks" not in t}
    for name in sorted(kept):
        if name in rows:
            indexer.leaves[name] = rows[name]
        else:
            indexer.add(name, (staged / name / "task.json").read_bytes())
    indexer.programmatic |= set(old_index.get("programmatic", []))


def swap_in(staged: Path, final: Path, old: Path) -> None:
    """Rename ``staged`` to ``final``; the previous ``final`` moves to ``old`` (or back)."""
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise


def extract(sdist: Path, home: Path, only: list[str] | None, progress: bool) -> None:
    root = bigbench_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".pull-"))
    try:
        staged = tmp / "benchmark_tasks"
        staged.mkdir()
        indexer = Indexer()
        indexer.meta = {"sdist": sdist.name, "only": only}
        written = stage(sdist, staged, only, indexer, progress)
        carry_over(home, staged, written, indexer)
        new_index = tmp / "index.json"
        indexer.write(new_index)
        swap_in(staged, tasks_dir(home), tmp / "old")
        os.replace(new_index, index_path(home))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
