"""The BIG-bench catalogue (``index.json``): one row per task, built once at pull time.

Every leaf task.json is parsed exactly as ``load_task`` would parse it, so the index
doubles as a check of the whole pull: tasks that fail land in ``errors`` with the
reason instead of surprising a user later. Containers (task.json files that only
group subtask directories) get a row when all their subtasks parse and agree on the
kind; their size is the sum of the subtasks'.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorashelf.config import write_json_atomic
from lorashelf.data.bigbench import is_container, parse_task
from lorashelf.errors import LorashelfError

INDEX_FORMAT = 1


def row(name: str, kind: str, n: int, description: str, keywords: Iterable[str]) -> dict:
    return {
        "id": f"bigbench:{name}",
        "name": name,
        "kind": kind,
        "n_examples": n,
        "description": description,
        "keywords": list(keywords),
    }


class Indexer:
    """Collects task rows from raw task.json bytes, then resolves containers."""

    def __init__(self) -> None:
        self.leaves: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.programmatic: set[str] = set()
        self.meta: dict[str, Any] = {}

    def add(self, name: str, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.errors[name] = f"{name}/task.json is not valid JSON: {e}"
            return
        if is_container(data):
            desc, kw = str(data.get("description", "")), data.get("keywords") or []
            self.containers[name] = {"description": desc, "keywords": [str(k) for k in kw]}
            return
        try:
            p = parse_task(data, name, where=f"{name}/task.json")
        except LorashelfError as e:
            self.errors[name] = str(e)
            return
        self.leaves[name] = row(name, p.kind, len(p.examples), p.description, p.keywords)

    def resolve_containers(self) -> list[dict[str, Any]]:
        rows = []
        for name, c in sorted(self.containers.items()):
            kids = sorted(k for k in {*self.leaves, *self.errors} if k.rpartition("/")[0] == name)
            bad = [k for k in kids if k in self.errors]
            kinds = {self.leaves[k]["kind"] for k in kids if k in self.leaves}
            if not kids or bad or len(kinds) != 1:
                why = (
                    "no subtask directories"
                    if not kids
                    else f"subtask {bad[0]} fails to parse"
                    if bad
                    else "its subtasks mix mc and gen; load them one by one"
                )
                self.errors[name] = f"bigbench:{name}: {why}"
                continue
            n = sum(self.leaves[k]["n_examples"] for k in kids)
            r = row(name, kinds.pop(), n, c["description"], c["keywords"])
            rows.append({**r, "subtasks": kids})
        return rows

    def to_json(self) -> dict[str, Any]:
        tasks = sorted([*self.leaves.values(), *self.resolve_containers()], key=lambda t: t["id"])
        return {
            "format": INDEX_FORMAT,
            **self.meta,
            "n_tasks": len(tasks),
            "tasks": tasks,
            "errors": dict(sorted(self.errors.items())),
            "programmatic": sorted(self.programmatic),
        }

    def write(self, path: Path) -> dict[str, Any]:
        index = self.to_json()
        write_json_atomic(path, index)
        return index

    @classmethod
    def scan(cls, root: Path, progress: bool = True) -> Indexer:
        """Index every task.json under ``root`` (when index.json went missing)."""
        indexer = cls()
        paths = sorted(root.rglob("task.json"))
        for path in tqdm(paths, desc="indexing BIG-bench", unit="task", disable=not progress):
            indexer.add(path.parent.relative_to(root).as_posix(), path.read_bytes())
        return indexer
