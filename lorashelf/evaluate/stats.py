"""Uncertainty for method comparisons: bootstrap intervals and paired tests.

At 30 examples per task a 0.03 accuracy difference is noise (the standard error of an
accuracy near 0.3 is about 0.08), so every comparison carries an interval.
:func:`bootstrap_ci` is the percentile bootstrap of a mean over examples (Efron &
Tibshirani 1993). :func:`mean_over_tasks_ci` resamples tasks, then examples within each
resampled task (a two-level bootstrap), so the interval of a mean over tasks reflects
both how few tasks there are and how few examples each has. :func:`paired_test` compares
two methods on the *same* examples: a two-sided sign-flip permutation test of the mean
per-example difference (exact under the null that the two methods are exchangeable on
each example), with the bootstrap interval of that difference. All draws come from a
seeded numpy Generator, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lorashelf.errors import LorashelfError

N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% (by default) bootstrap interval."""

    mean: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


@dataclass(frozen=True)
class PairedResult:
    """``a - b`` on the same examples: mean difference, its interval, two-sided p."""

    diff: Interval
    p_value: float
    n: int


def _values(values: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise LorashelfError(f"{what}: need a non-empty list of per-example values")
    if not np.isfinite(v).all():
        raise LorashelfError(f"{what}: per-example values contain NaN or inf")
    return v


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (resampling examples)."""
    v = _values(values, "bootstrap_ci")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return Interval(float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def mean_over_tasks_ci(
    per_task: Mapping[str, Sequence[float]],
    *,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of the mean over tasks of each task's mean: tasks resampled, then the
    examples of each drawn task."""
    tasks = [_values(v, f"task {t}") for t, v in per_task.items()]
    if not tasks:
        raise LorashelfError("mean_over_tasks_ci: no tasks")
    rng = np.random.default_rng(seed)
    point = float(np.mean([t.mean() for t in tasks]))
    means = np.empty(n_boot)
    for b in range(n_boot):
        drawn = rng.integers(0, len(tasks), size=len(tasks))
        means[b] = np.mean(
            [tasks[i][rng.integers(0, tasks[i].size, tasks[i].size)].mean() for i in drawn]
        )
    a = (1 - level) / 2
    return Interval(point, float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_perm: int = 10000,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> PairedResult:
    """Is ``mean(a - b)`` different from 0? ``a`` and ``b`` score the same examples in
    the same order (e.g. two methods' per-example NLL on one task)."""
    x, y = _values(a, "paired_test a"), _values(b, "paired_test b")
    if x.shape != y.shape:
        raise LorashelfError(
            f"paired_test needs the same examples for both methods; got {x.size} and {y.size}"
        )
    d = x - y
    rng = np.random.default_rng(seed)
    observed = abs(d.mean())
    signs = rng.choice((-1.0, 1.0), size=(n_perm, d.size))
    null = np.abs((signs * d).mean(axis=1))
    # the observed labelling counts as one of the permutations (never p = 0)
    p = (1 + int((null >= observed - 1e-15).sum())) / (n_perm + 1)
    return PairedResult(bootstrap_ci(d, n_boot=n_boot, seed=seed), float(p), int(d.size))


def interval_table(results: Sequence, baseline: str | None = None) -> list[list[str]] | None:
    """Rows (header first) of every method's mean over tasks with its 95% interval,
    sorted by mean gold NLL, and the paired test against ``baseline`` (each task's
    examples paired, pooled). Only results with per-example values are listed; None
    when there are none."""
    # methods scored without per-example values (older JSON, means over few-shot seeds)
    # have no interval and are left out of this table
    results = [r for r in results if r.tasks and all(t.nlls for t in r.tasks.values())]
    if not results:
        return None
    base = next((r for r in results if r.method == baseline), None)
    rows = []
    for r in results:
        nll = mean_over_tasks_ci({t: v.nlls for t, v in r.tasks.items()})
        acc = mean_over_tasks_ci({t: [float(c) for c in v.correct] for t, v in r.tasks.items()})
        vs = "-"
        if base is not None and r is not base and base.tasks.keys() == r.tasks.keys():
            a = [x for t in r.tasks for x in r.tasks[t].nlls]
            b = [x for t in r.tasks for x in base.tasks[t].nlls]
            if len(a) == len(b):
                p = paired_test(a, b)
                vs = f"{p.diff.mean:+.3f} (p={p.p_value:.3g})"
        rows.append((nll.mean, [r.method, str(nll), str(acc), vs]))
    header = ["method", "gold NLL [95% CI]", "accuracy [95% CI]", f"NLL vs {baseline} (paired)"]
    return [header] + [row for _, row in sorted(rows, key=lambda kv: kv[0])]
