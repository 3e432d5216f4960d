"""The BIG-bench JSON task format -> rendered examples.

Follows the semantics of BIG-bench's ``bigbench/api/json_task.py`` (Srivastava et al.
2022, arXiv 2206.04615): duplicate examples are dropped; the text a model reads is
``task_prefix + example_input_prefix + input [+ choices] + example_output_prefix``
with defaults ``""``, ``"\\nQ: "`` and ``"\\nA: "``; multiple-choice examples
(``target_scores``) list their choices after the input, each behind ``choice_prefix``
(default ``"\\n  choice: "``) unless ``append_choices_to_input`` is false, and are scored
on the choices in ``target_scores`` order with the gold the highest score (the first
on ties); generative examples accept every ``target`` (a string or a list).

One deliberate difference: BIG-bench shows the choices in an order drawn from
``np.random.RandomState(42)`` re-created per example, so every example with the same
number of choices gets the same permutation. Here the sorted choices are shuffled by
``random.Random(f"{task name}|{input}")``: still deterministic and independent of the
example's position, but varied across examples. A trailing space of the prompt moves
onto the answers (``"\\nA:"`` + ``" yes"``), so ``prompt + option`` is exactly the
BIG-bench text and tokenizes as it would be read. Flags are read as json_task.py
reads them, by Python truthiness: ``"append_choices_to_input": "false"`` (a string,
in six tasks) appends the choices there, and here too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lorashelf.data.rows import make_example, move_trailing_space
from lorashelf.data.sources import subset
from lorashelf.data.task import Example, Kind
from lorashelf.errors import LorashelfError

MC_METRICS = {
    "multiple_choice_grade",
    "calibration_multiple_choice_brier_score",
    "expected_calibration_error",
    "weighted_log_probabilities",
    "weighted_probabilities",
    "macro_f1",
}


@dataclass(frozen=True)
class Parsed:
    """One BIG-bench task.json with examples, rendered."""

    name: str
    examples: tuple[Example, ...]
    kind: Kind
    description: str
    canary: str
    keywords: tuple[str, ...]


def is_container(data: Any) -> bool:
    """A task.json without ``examples`` only describes its subtask directories."""
    return isinstance(data, dict) and "examples" not in data


def distinct(examples: Sequence[Any]) -> list[Any]:
    """Drop exact duplicates (by their JSON), keeping the first; as BIG-bench does."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def shown_choices(choices: Sequence[str], task_name: str, text: str) -> list[str]:
    """The order choices are listed in the prompt: sorted, then shuffled per example."""
    order = sorted(choices)
    random.Random(f"{task_name}|{text}").shuffle(order)
    return order


def gold(ex: Mapping[str, Any], where: str) -> tuple[int, tuple[float, ...]]:
    """The first top-scored choice and every choice's credit.

    When no choice scores higher than the others, BIG-bench falls back on the
    example's ``target``; then that choice alone is right (no credit vector).
    """
    scores = ex["target_scores"]
    values = list(scores.values())
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise LorashelfError(f"{where}: target_scores must map choices to numbers")
    best = max(values)
    if (len(values) == 1 and best == 0) or (len(values) > 1 and best <= min(values)):
        if isinstance(ex.get("target"), str) and ex["target"] in scores:
            return list(scores).index(ex["target"]), ()
        raise LorashelfError(f"{where}: no choice scores higher than the others; fix the file")
    return values.index(best), tuple(float(v) for v in values)


def as_targets(target: Any, where: str) -> list[str]:
    targets = target if isinstance(target, list) else [target]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise LorashelfError(f"{where}: target must be a string or a non-empty list of strings")
    return targets


def render_example(
    ex: Mapping[str, Any], fmt: Mapping[str, Any], kind: Kind, where: str
) -> Example:
    """One raw BIG-bench example -> :class:`Example` in the task's format."""
    text = ex.get("input")
    if not isinstance(text, str):
        raise LorashelfError(f"{where}: 'input' must be a string")
    if kind == "mc":
        scores = ex["target_scores"]
        if not isinstance(scores, dict):
            raise LorashelfError(f"{where}: target_scores must be an object")
        if fmt["append_choices_to_input"]:
            shown = shown_choices(list(scores), fmt["name"], text)
            text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(shown)
    prompt = fmt["task_prefix"] + fmt["input_prefix"] + text + fmt["output_prefix"]
    if kind == "mc":
        prompt, options = move_trailing_space(prompt, list(scores))
        answer, credit = gold(ex, where)
        return replace(make_example(prompt, options=options, answer=answer), scores=credit)
    prompt, targets = move_trailing_space(prompt, as_targets(ex["target"], where))
    return make_example(prompt, targets=targets)


def choose_kind(data: Mapping[str, Any], examples: Sequence[Any], where: str) -> Kind:
    """mc when the task is scored by multiple choice (or only has target_scores)."""
    has_scores = all(isinstance(e, dict) and "target_scores" in e for e in examples)
    has_target = all(isinstance(e, dict) and "target" in e for e in examples)
    wants_mc = bool(MC_METRICS & set(data.get("metrics") or []))
    if has_scores and (wants_mc or not has_target):
        return "mc"
    if has_target:
        return "gen"
    raise LorashelfError(
        f"{where}: every example needs 'input' and either 'target' or 'target_scores' "
        "(all the same kind); fix the file"
    )


def task_format(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {
        "name": name,
        "task_prefix": str(data.get("task_prefix", "")),
        "input_prefix": data.get("example_input_prefix", "\nQ: "),
        "output_prefix": data.get("example_output_prefix", "\nA: "),
        "choice_prefix": data.get("choice_prefix", "\n  choice: "),
        "append_choices_to_input": data.get("append_choices_to_input", True),
    }


def parse_task(data: Any, name: str, where: str, max_examples: int | None = None) -> Parsed:
    """Parse one task.json holding examples (not a container of subtasks)."""
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise LorashelfError(f"{where}: not a BIG-bench task (no 'examples' list)")
    raw = distinct(data["examples"])
    if not raw:
        raise LorashelfError(
            f"{where}: task has no examples; add examples to the file or pick another task"
        )
    kind = choose_kind(data, raw, where)
    fmt = task_format(data, name)
    raw = subset(raw, max_examples, seed=f"bigbench:{name}")
    examples = tuple(
        render_example(ex, fmt, kind, f"{where}: example {i}") for i, ex in enumerate(raw)
    )
    return Parsed(
        name=name,
        examples=examples,
        kind=kind,
        description=str(data.get("description", "")),
        canary=str(data.get("canary", "")),
        keywords=tuple(str(k) for k in data.get("keywords") or ()),
    )
