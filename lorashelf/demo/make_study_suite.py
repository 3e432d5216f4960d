"""Build the ``study`` suite (``lorashelf/suites/study.json``) by a fixed rule, not by hand.

The rule (docs/study/SUITE.md explains it; nothing in it looks at any method's results):

1. **Eligible** tasks are BIG-bench JSON leaf tasks (programmatic tasks and task.json
   files that only group subtasks are not) of kind ``mc`` or ``gen`` with at least
   ``min_examples`` examples whose median prompt is at most ``max_prompt_chars``
   characters and whose median gold answer is at most ``max_target_chars`` (the model
   reads at most ``max_length`` tokens, and long generations are not what a 135M model
   is judged on).
2. A task's **family** is its parent task (``arithmetic/2_digit_addition`` ->
   ``arithmetic``); a task without subtasks is a family of one.
3. Every family gets a rank: the SHA-256 of ``"{seed}|{family}"``; tasks inside a
   family are ranked the same way by their own name.
4. **Unseen** held-out: the ``n_unseen`` best-ranked families that have a task with at
   least ``heldout_examples`` examples; that task (the best-ranked such) is held out and
   the whole family is kept out of training.
5. **Seen** held-out: of the remaining families with two or more eligible tasks, the
   ``n_seen`` best-ranked that have a task with at least ``heldout_examples`` examples;
   that task is held out and the family's best-ranked other task is its sibling (the
   oracle's expert), always in training.
6. **Training**: the siblings, then the other eligible tasks of the non-unseen
   families in rank order, at most ``per_family`` per family, up to ``n_train``.

``python -m lorashelf.demo.make_study_suite --home HOME`` (after a full ``lorashelf
data pull bigbench``) writes the suite; the same index and rule always give the same
file. The BIG-bench canary string is copied into it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorashelf.demo.suite import family_of
from lorashelf.errors import LorashelfError


@dataclass(frozen=True)
class Rule:
    seed: int = 0
    min_examples: int = 150
    heldout_examples: int = 500  # a 20% test split of >= 100 examples
    max_prompt_chars: int = 1000
    max_target_chars: int = 60
    n_train: int = 64
    n_seen: int = 6
    n_unseen: int = 6
    per_family: int = 3


@dataclass(frozen=True)
class Candidate:
    """One BIG-bench leaf task, as much as the rule needs to know of it."""

    id: str
    kind: str
    n: int
    prompt_chars: float  # median over examples
    target_chars: float  # median gold answer


def rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}|{name}".encode()).hexdigest()


def eligible(cands: Sequence[Candidate], rule: Rule) -> list[Candidate]:
    return [
        c
        for c in cands
        if c.kind in ("mc", "gen")
        and c.n >= rule.min_examples
        and c.prompt_chars <= rule.max_prompt_chars
        and c.target_chars <= rule.max_target_chars
    ]


def select(cands: Sequence[Candidate], rule: Rule = Rule()) -> dict[str, Any]:
    """The suite's task lists from the candidates by the rule above (pure, deterministic)."""
    ok = eligible(cands, rule)
    families: dict[str, list[Candidate]] = {}
    for c in sorted(ok, key=lambda c: rank(rule.seed, c.id)):
        families.setdefault(family_of(c.id), []).append(c)
    order = sorted(families, key=lambda f: rank(rule.seed, f))

    def heldout_of(f: str) -> Candidate | None:
        return next((c for c in families[f] if c.n >= rule.heldout_examples), None)

    unseen = [f for f in order if heldout_of(f) is not None][: rule.n_unseen]
    rest = [f for f in order if f not in unseen]
    seen = [f for f in rest if len(families[f]) >= 2 and heldout_of(f) is not None]
    seen = seen[: rule.n_seen]
    if len(unseen) < rule.n_unseen or len(seen) < rule.n_seen:
        raise LorashelfError(
            f"only {len(unseen)} unseen and {len(seen)} seen families qualify "
            f"(need {rule.n_unseen} and {rule.n_seen}); pull all of BIG-bench first "
            "(lorashelf data pull bigbench) or relax the rule"
        )
    heldout: dict[str, str] = {}
    for f in seen:
        held = heldout_of(f)
        assert held is not None
        sibling = next(c for c in families[f] if c is not held)
        heldout[held.id] = sibling.id
    train = list(heldout.values())
    taken = {f: 1 for f in seen}
    for f in rest:
        for c in families[f]:
            if len(train) >= rule.n_train:
                break
            if c.id in heldout or c.id in train or taken.get(f, 0) >= rule.per_family:
                continue
            train.append(c.id)
            taken[f] = taken.get(f, 0) + 1
    if len(train) < rule.n_train:
        raise LorashelfError(
            f"only {len(train)} training tasks qualify (need {rule.n_train}); relax the rule"
        )
    groups: dict[str, list[str]] = {}
    for t in train:
        groups.setdefault(family_of(t).split(":", 1)[1], []).append(t)
    return {
        "train": train,
        "heldout": heldout,
        "unseen": [heldout_of(f).id for f in unseen],  # type: ignore[union-attr]
        "families": {f: ts for f, ts in sorted(groups.items()) if len(ts) >= 2},
    }


def candidates(home: Path) -> tuple[list[Candidate], str]:
    """Every leaf task of the pulled BIG-bench index, measured; and the canary string."""
    from lorashelf.data import load_task
    from lorashelf.data.bigbench_store import read_index

    index = read_index(home)
    out, canary = [], ""
    for row in index["tasks"]:
        if row.get("subtasks"):
            continue
        task = load_task(row["id"], home=home)
        prompts = [len(e.prompt) for e in task.examples]
        golds = [len(e.target) for e in task.examples]
        canary = canary or task.canary
        out.append(
            Candidate(
                row["id"], row["kind"], len(task.examples),
                statistics.median(prompts), statistics.median(golds),
            )
        )  # fmt: skip
    return out, canary


def suite_json(
    picked: Mapping[str, Any], rule: Rule, canary: str, budget: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "name": "study",
        "description": (
            f"{len(picked['train'])} BIG-bench training tasks and {len(picked['heldout'])} "
            f"held-out tasks whose sibling is in the library plus {len(picked['unseen'])} from "
            "families absent from it, chosen by lorashelf/demo/make_study_suite.py "
            "(docs/study/SUITE.md)."
        ),
        "canary": canary,
        **picked,
        "rule": asdict(rule),
        **budget,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, required=True, help="lorashelf home with all of BIG-bench")
    p.add_argument("--out", type=Path, default=Path("lorashelf/suites/study.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rule = Rule(seed=args.seed)
    cands, canary = candidates(args.home)
    picked = select(cands, rule)
    budget: dict[str, Any] = {}
    if args.out.exists():  # keep the budget fields (sized by hand, docs/study/SUITE.md)
        old = json.loads(args.out.read_text())
        keep = set(old) - {"name", "description", "canary", "rule", *picked}
        budget = {k: old[k] for k in sorted(keep)}
    args.out.write_text(json.dumps(suite_json(picked, rule, canary, budget), indent=2) + "\n")
    n_ok = len(eligible(cands, rule))
    print(f"{len(cands)} leaf tasks, {n_ok} eligible; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
