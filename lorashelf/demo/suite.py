"""Demo suites: which tasks build the library and which held-out tasks judge it.

A suite (JSON shipped in ``lorashelf/suites/``) lists training tasks grouped in
families of sibling BIG-bench tasks with distinct formats plus unrelated tasks, and
held-out tasks each mapped to its sibling training task (the oracle's expert).
A suite may also hold ``unseen`` held-out tasks whose whole family is absent from
training (no oracle), a ``canary`` (the BIG-bench canary string, kept in every file
derived from its tasks) and a ``study`` block: the budget of ``lorashelf demo --suite
study`` (lorashelf.demo.study). Training and held-out tasks never overlap: that is
checked on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError, did_you_mean


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    train: tuple[str, ...]
    heldout: dict[str, str]  # held-out task -> sibling training task
    families: dict[str, list[str]] = field(default_factory=dict)
    clusters: int = 3
    train_examples: int = 200  # examples read per task (before the split)
    eval_limit: int = 40  # test examples per held-out task
    train_steps: int = 60
    train_batch: int = 8
    max_length: int = 384
    gate_steps: int = 30
    shots: int = 5
    seeds: int = 3
    lorahub_budget: int = 40
    # the methods beyond Ostapenko et al.'s on the private library, and the few-shot
    # methods: None runs every registered one; a list keeps a small suite fast
    more_methods: tuple[str, ...] | None = None
    fewshot_methods: tuple[str, ...] | None = None
    unseen: tuple[str, ...] = ()  # held-out tasks of families absent from training
    canary: str = ""
    study: dict[str, Any] = field(default_factory=dict)
    rule: dict[str, Any] = field(default_factory=dict)  # how the tasks were chosen
    model: str = ""  # study suites: the base model (default: the embedded SmolLM2)
    # GenKnowSub: the tasks whose inputs a general-knowledge expert trains on, and how
    # many texts of how many characters ({"tasks": [...], "texts": 300, "max_chars": 500});
    # empty: no GenKnowSub rows
    general: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated(self) -> list[str]:
        """Every held-out task: the seen families' first, then the unseen ones."""
        return [*self.heldout, *self.unseen]

    @property
    def bigbench_names(self) -> list[str]:
        ids = [*self.train, *self.heldout, *self.unseen, *self.general.get("tasks", ())]
        return sorted({t.split(":", 1)[1] for t in ids if t.startswith("bigbench:")})


def shipped() -> list[str]:
    return sorted(
        p.name.removesuffix(".json")
        for p in resources.files("lorashelf.suites").iterdir()
        if p.name.endswith(".json")
    )


def load_suite(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        data = json.loads(path.read_text())
    else:
        names = shipped()
        if name_or_path not in names:
            raise LorashelfError(
                f"unknown suite {name_or_path!r}{did_you_mean(name_or_path, names)}; shipped: {', '.join(names)}, or pass a suite .json file"
            )
        data = json.loads(
            resources.files("lorashelf.suites").joinpath(f"{name_or_path}.json").read_text()
        )
    data["train"] = tuple(data["train"])
    for key in ("more_methods", "fewshot_methods"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    data["unseen"] = tuple(data.get("unseen", ()))
    suite = Suite(**data)
    overlap = set(suite.train) & set(suite.evaluated)
    if overlap:
        raise LorashelfError(
            f"suite {suite.name}: held-out tasks also in training: {sorted(overlap)}"
        )
    missing = [s for s in suite.heldout.values() if s not in suite.train]
    if missing:
        raise LorashelfError(f"suite {suite.name}: sibling tasks not in training: {missing}")
    seen = {family_of(t) for t in suite.train}
    leaked = [t for t in suite.unseen if family_of(t) in seen]
    if leaked:
        raise LorashelfError(
            f"suite {suite.name}: unseen tasks whose family is in training: {leaked}"
        )
    _check_methods(suite)
    return suite


def family_of(task_id: str) -> str:
    """``bigbench:arithmetic/3_digit_addition`` -> ``bigbench:arithmetic``: a BIG-bench
    task's family is its parent task (a task without subtasks is its own family)."""
    return task_id.split("/", 1)[0]


def _check_methods(suite: Suite) -> None:
    """A suite's method lists name registered methods (checked before anything runs)."""
    from lorashelf.compose.registry import FEWSHOT_METHODS
    from lorashelf.merge.registry import MERGES
    from lorashelf.route.registry import ROUTERS

    zero_shot = [*MERGES.names(), *ROUTERS.names(), "best-expert:test", "best-expert:shots"]
    for key, known in (("more_methods", zero_shot), ("fewshot_methods", FEWSHOT_METHODS.names())):
        for name in getattr(suite, key) or ():
            if name not in known:
                raise LorashelfError(
                    f"suite {suite.name}: unknown method {name!r} in {key}"
                    f"{did_you_mean(name, known)}; known: {', '.join(known)}"
                )
