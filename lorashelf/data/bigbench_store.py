"""Pulled BIG-bench tasks on disk, their catalogue, and the ``bigbench:`` source.

Layout under the cache root: ``HOME/data/bigbench/benchmark_tasks/<name>/task.json``
(files copied verbatim from the official sdist, canary strings included) and
``HOME/data/bigbench/index.json``, written at pull time so listing 1,000+ tasks does
not parse 1.7 GB of JSON. ``<name>`` is the task's path under ``benchmark_tasks``
(``logical_deduction/three_objects``); a task.json without examples is a container
whose subtasks, in sorted directory order, make up the task, as in BIG-bench.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorashelf.data.bigbench import Parsed, is_container, parse_task
from lorashelf.data.bigbench_index import INDEX_FORMAT, Indexer
from lorashelf.data.sources import Source, TaskInfo
from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError, did_you_mean


def bigbench_dir(home: Path) -> Path:
    return Path(home) / "data" / "bigbench"


def tasks_dir(home: Path) -> Path:
    return bigbench_dir(home) / "benchmark_tasks"


def index_path(home: Path) -> Path:
    return bigbench_dir(home) / "index.json"


def read_task_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorashelfError(
            f"{path} is not valid JSON ({e}); fix it or re-pull it with "
            f"`lorashelf data pull bigbench --only {name}`"
        ) from None


def read_index(home: Path) -> dict[str, Any] | None:
    path = index_path(home)
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return index if index.get("format") == INDEX_FORMAT else None


def check_name(name: str) -> None:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise LorashelfError(
            f"bad BIG-bench task name {name!r}; use a path under benchmark_tasks such as "
            "logical_deduction/three_objects"
        )


def collect(name: str, path: Path, max_examples: int | None) -> tuple[list[Parsed], Any]:
    """Parse ``path`` (a leaf) or every task under it (a container); also its JSON."""
    data = read_task_json(path, name)
    if not is_container(data):
        return [parse_task(data, name, str(path), max_examples)], data
    subdirs = sorted(p for p in path.parent.iterdir() if (p / "task.json").is_file())
    if not subdirs:
        raise LorashelfError(
            f"{path} has neither examples nor subtask directories; add an 'examples' "
            "list or re-pull the task"
        )
    per = None
    if max_examples is not None:
        per = max_examples // len(subdirs)
        if per < 1:
            raise LorashelfError(
                f"bigbench:{name} has {len(subdirs)} subtasks; max_examples must be at "
                f"least {len(subdirs)} (one per subtask)"
            )
    parsed = [p for d in subdirs for p in collect(f"{name}/{d.name}", d / "task.json", per)[0]]
    return parsed, data


def load(name: str, home: Path, max_examples: int | None) -> Task:
    check_name(name)
    root = tasks_dir(home)
    if not root.is_dir():
        raise LorashelfError(
            f"no BIG-bench tasks under {bigbench_dir(home)}; run "
            f"`lorashelf data pull bigbench --only {name}` (or without --only for all)"
        )
    path = root / name / "task.json"
    if not path.is_file():
        raise unknown_task(name, home)
    parts, data = collect(name, path, max_examples)
    kinds = sorted({p.kind for p in parts})
    if len(kinds) > 1:
        subtasks = ", ".join(f"bigbench:{p.name} ({p.kind})" for p in parts)
        raise LorashelfError(
            f"bigbench:{name} mixes multiple-choice and generative subtasks; load them "
            f"one by one: {subtasks}"
        )
    return Task(
        id=f"bigbench:{name}",
        examples=tuple(ex for p in parts for ex in p.examples),
        kind=kinds[0],
        description=str(data.get("description", "")),
        canary=str(data.get("canary", "")),
        metadata={"source": "bigbench", "path": str(path)},
    )


def unknown_task(name: str, home: Path) -> LorashelfError:
    index = read_index(home) or {}
    if name in index.get("programmatic", []):
        return LorashelfError(
            f"bigbench:{name} is a programmatic BIG-bench task (task.py, no task.json); "
            "lorashelf reads JSON tasks only, pick another task"
        )
    known = sorted(
        p.parent.relative_to(tasks_dir(home)).as_posix() for p in tasks_dir(home).rglob("task.json")
    )
    return LorashelfError(
        f"unknown BIG-bench task {name!r}{did_you_mean(name, known)}; {len(known)} tasks "
        f"are pulled (`lorashelf data ls --source bigbench`); for one not pulled yet run "
        f"`lorashelf data pull bigbench --only {name}`"
    )


def ls(home: Path) -> list[TaskInfo]:
    """The catalogue from index.json (rebuilt by scanning if it is missing)."""
    index = read_index(home)
    if index is None:
        if not tasks_dir(home).is_dir():
            return []
        index = Indexer.scan(tasks_dir(home)).write(index_path(home))
    return [
        TaskInfo(
            id=t["id"],
            kind=t["kind"],
            n_examples=t["n_examples"],
            description=t["description"],
            keywords=tuple(t["keywords"]),
        )
        for t in index["tasks"]
    ]


SOURCE = Source(load=load, ls=ls)
