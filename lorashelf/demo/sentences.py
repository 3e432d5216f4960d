"""The demo report's "Methods" section: one sentence per method, written from its numbers.

Each sentence has a fixed part, what the method does (the one-line summary its
registry entry declares), and a measured part generated from this run's results:
on how many held-out tasks it has a lower gold NLL and a higher accuracy than the base
model, which tasks it does not help, and how much of the mean-NLL gap between the base
model and the best single expert chosen on the test set (an upper bound on picking
one expert) it closes. Nothing measured is typed in, so the text cannot go stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorashelf.evaluate.runner import EvalResult

OWN = {
    "base": "the base model alone",
    "expert:shared": "one expert trained jointly on all training tasks (multi-task)",
}
GKS = {
    "delta": "Arrow over each expert minus the update of a general-knowledge expert trained "
    "on plain text (GenKnowSub, exact variant: s B A - s_g B_g A_g)",
    "peft": "Arrow over each expert minus a general-knowledge expert trained on plain text "
    "(GenKnowSub, PEFT's variant: A - A_g and B - B_g apart)",
}
CLUSTERED = "MBC clusters the private experts by similarity and trains one expert per cluster; "


@dataclass(frozen=True)
class Row:
    """One column of the demo's tables: its label, the method spec it ran
    (``ties``, ``best-expert:test``, ``fewshot:cat``) and the library it used."""

    label: str
    spec: str
    library: str | None
    result: EvalResult


def describe(spec: str, library: str | None) -> str:
    """What the method does, in one line (from its registry's summary)."""
    if spec in OWN:
        return OWN[spec]
    if spec.startswith("gks:"):
        return GKS[spec.split(":", 1)[1]]
    if spec.startswith("fewshot:"):
        from lorashelf.compose.registry import FEWSHOT_METHODS

        return FEWSHOT_METHODS.get(spec.split(":", 1)[1]).summary
    from lorashelf.methods import split_spec

    method, arg = split_spec(spec)
    text = method.summary
    if method.name == "best-expert":
        text = (
            "the single expert with the lowest gold NLL on the test examples themselves"
            if arg == "test"
            else "the single expert with the lowest gold NLL on 5 train shots"
        )
    return (CLUSTERED + text) if library == "mbc" else text


def _short(task: str) -> str:
    return task.split(":", 1)[-1]


def sentence(row: Row, base: EvalResult | None, upper: EvalResult | None) -> str:
    """``label: what it does. What it did here against base and the upper bound.``"""
    desc = describe(row.spec, row.library)
    name, _, rest = desc.partition(":")
    if rest and name.lower() in row.label.lower():  # "PHATGOOSE: PHATGOOSE: ..." reads twice
        desc = rest.strip()
    head = f"{row.label}: {desc}."
    r = row.result
    if base is None or row.spec == "base":
        return head
    tasks = [t for t in r.tasks if t in base.tasks]
    n = len(tasks)
    nll_wins = [t for t in tasks if r.tasks[t].nll < base.tasks[t].nll]
    acc_up = sum(r.tasks[t].accuracy > base.tasks[t].accuracy for t in tasks)
    acc_down = sum(r.tasks[t].accuracy < base.tasks[t].accuracy for t in tasks)
    text = (
        f" Here: lower gold NLL than base on {len(nll_wins)}/{n} held-out tasks (mean "
        f"{r.mean_nll:.3f} against {base.mean_nll:.3f}), higher accuracy on {acc_up}/{n} "
        f"and lower on {acc_down}/{n} (mean {r.mean_accuracy:.3f} against "
        f"{base.mean_accuracy:.3f})"
    )
    if upper is not None and upper is not r and base.mean_nll > upper.mean_nll:
        closed = (base.mean_nll - r.mean_nll) / (base.mean_nll - upper.mean_nll)
        if closed > 1.0:
            text += (
                f"; its mean NLL beats even the best single expert chosen on test "
                f"({upper.mean_nll:.3f})"
            )
        else:
            text += f"; it closes {closed:.0%} of the NLL gap from base to the best single expert"
    missed = [t for t in tasks if t not in nll_wins]
    if missed and len(missed) < n:
        text += f"; it does not help on {', '.join(_short(t) for t in missed)}"
    elif n and not nll_wins:
        text += "; it helps on none of them"
    return head + text + "."


def methods_text(rows: Sequence[Row], n_examples: int) -> str:
    """The section: a note on the noise, then one paragraph per row."""
    base = next((r.result for r in rows if r.spec == "base"), None)
    upper = next((r.result for r in rows if r.spec == "best-expert:test"), None)
    intro = (
        f"One paragraph per method: what it does, then what it did in this run ({n_examples} "
        "test examples per held-out task, so accuracy moves in steps of "
        f"{1 / max(n_examples, 1):.3f} and a difference of a few examples is noise; the "
        "interval table above gives each mean's 95% interval). The best single expert chosen "
        "on the test set has seen the examples it is scored on: it is an upper bound on "
        "choosing one expert, not a method."
    )
    return "\n\n".join([intro, *(sentence(r, base, upper) for r in rows)])
