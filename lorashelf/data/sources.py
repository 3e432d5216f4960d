"""Task sources: ``SOURCE:NAME`` ids dispatched through a registry.

A source turns the part of a task id after the first ``:`` into a :class:`Task`
(``bigbench:sports_understanding``, ``jsonl:./my.jsonl``, ``hf:data.parquet?...``) and
may list the tasks it knows. Adding a source costs one module and one
line in ``SOURCES`` below, as with lm-eval's task registry. This module also
holds what every source shares: ``?key=value`` options in ids and the
deterministic ``max_examples`` subset.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl

from lorashelf.data.task import Kind, Task
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.registry import Registry

T = TypeVar("T")


@dataclass(frozen=True)
class TaskInfo:
    """One row of a source's catalogue (what ``lorashelf data ls`` prints)."""

    id: str
    kind: Kind
    n_examples: int
    description: str = ""
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """``load(name, home, max_examples)`` builds a task; ``ls(home)`` lists known ones."""

    load: Callable[[str, Path, int | None], Task]
    ls: Callable[[Path], list[TaskInfo]] = field(default=lambda home: [])


SOURCES: Registry[Source] = Registry(
    "task source",
    {
        "bigbench": "lorashelf.data.bigbench_store:SOURCE",
        "jsonl": "lorashelf.data.jsonl:SOURCE",
        "hf": "lorashelf.data.hf:SOURCE",
    },
)


def split_id(task_id: str) -> tuple[str, str]:
    """``"bigbench:a/b"`` -> ``("bigbench", "a/b")``, with a helpful error otherwise."""
    source, sep, name = task_id.partition(":")
    if not sep or not name:
        raise LorashelfError(
            f"task id {task_id!r} has no source; write SOURCE:NAME with SOURCE one of "
            f"{', '.join(SOURCES.names())}, e.g. bigbench:sports_understanding"
        )
    return source, name


def load_task(task_id: str, *, home: Path, max_examples: int | None = None) -> Task:
    """Load a task by id, e.g. ``bigbench:logical_deduction/three_objects``.

    ``max_examples`` keeps a deterministic random subset (seeded by the task id, in
    the original order), so a cap never just takes the first, often sorted, rows.
    """
    if max_examples is not None and max_examples < 1:
        raise LorashelfError(f"max_examples must be >= 1, got {max_examples}")
    source, name = split_id(task_id)
    return SOURCES.get(source).load(name, Path(home), max_examples)


def list_tasks(home: Path, source: str | None = None, kind: str | None = None) -> list[TaskInfo]:
    """Tasks the sources know about under ``home`` (only BIG-bench keeps a catalogue)."""
    if kind is not None and kind not in ("mc", "gen"):
        raise LorashelfError(f"unknown task kind {kind!r}; use mc or gen")
    names = [source] if source is not None else SOURCES.names()
    rows = [info for s in names for info in SOURCES.get(s).ls(Path(home))]
    return [r for r in rows if kind is None or r.kind == kind]


def subset(items: Sequence[T], max_examples: int | None, seed: str) -> list[T]:
    """At most ``max_examples`` items, chosen at random by ``seed``, order preserved."""
    if max_examples is None or max_examples >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
    return [items[i] for i in keep]


def parse_options(spec: str, allowed: Sequence[str], what: str) -> tuple[str, dict[str, str]]:
    """``"path?a=1&b=x"`` -> ``("path", {"a": "1", "b": "x"})``; unknown keys are errors."""
    base, _, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    for k in opts:
        if k not in allowed:
            raise LorashelfError(
                f"unknown option {k!r} in {what} id{did_you_mean(k, allowed)}; "
                f"valid: {', '.join(allowed)}"
            )
    return base, opts
