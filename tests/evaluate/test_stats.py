"""Bootstrap intervals and the paired permutation test against exact computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lorashelf.errors import LorashelfError
from lorashelf.evaluate.stats import bootstrap_ci, mean_over_tasks_ci, paired_test


def test_constant_values_have_a_zero_width_interval():
    ci = bootstrap_ci([0.5] * 20)
    assert (ci.mean, ci.lo, ci.hi) == (0.5, 0.5, 0.5)


def test_interval_width_matches_the_normal_approximation():
    v = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    ci = bootstrap_ci(v, n_boot=4000)
    half = 1.96 * v.std() / np.sqrt(v.size)
    assert ci.lo < v.mean() < ci.hi
    assert (ci.hi - ci.lo) / 2 == pytest.approx(half, rel=0.1)


def test_seeded_and_reproducible():
    v = np.random.default_rng(2).random(50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)


def test_paired_p_value_equals_the_exact_sign_flip_test():
    d = np.array([0.9, -0.2, 0.4, 0.7, 0.1, -0.5, 0.8, 0.3])
    exact = np.mean(
        [abs((np.array(s) * d).mean()) >= abs(d.mean()) - 1e-15
         for s in itertools.product((-1, 1), repeat=d.size)]
    )  # fmt: skip
    res = paired_test(d, np.zeros_like(d), n_perm=40000)
    assert res.p_value == pytest.approx(exact, abs=0.01)
    assert res.diff.mean == pytest.approx(d.mean())


def test_paired_test_separates_a_shift_from_noise():
    rng = np.random.default_rng(0)
    b = rng.random(60)
    assert paired_test(b + 0.3, b).p_value < 0.001
    assert paired_test(b, b).p_value == 1.0
    noisy = paired_test(b + rng.normal(0, 0.01, 60), b)
    assert noisy.p_value > 0.05 and noisy.diff.lo < 0 < noisy.diff.hi


def test_mean_over_tasks_is_wider_when_tasks_disagree():
    rng = np.random.default_rng(0)
    same = {f"t{i}": rng.normal(1.0, 0.5, 50) for i in range(4)}
    apart = {f"t{i}": rng.normal(float(i), 0.5, 50) for i in range(4)}
    a, b = mean_over_tasks_ci(same), mean_over_tasks_ci(apart)
    assert a.lo < a.mean < a.hi and b.lo < b.mean < b.hi
    assert (b.hi - b.lo) > 3 * (a.hi - a.lo)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(LorashelfError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(LorashelfError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(LorashelfError, match="same examples"):
        paired_test([1.0, 2.0], [1.0])


def test_interval_table_sorts_by_nll_and_tests_against_base():
    from lorashelf.evaluate.runner import EvalConfig, EvalResult, TaskResult
    from lorashelf.evaluate.stats import interval_table

    rng = np.random.default_rng(0)

    def result(method, shift):
        tasks = {}
        for t in ("a", "b"):
            nlls = list(rng.random(30) + 1.0 + shift)
            correct = [bool(x) for x in rng.random(30) < 0.5]
            tasks[t] = TaskResult(30, float(np.mean(correct)), float(np.mean(nlls)), "mc", 1.0,
                                  correct, nlls)  # fmt: skip
        return EvalResult(method, tasks, EvalConfig())

    rows = interval_table([result("base", 0.0), result("good", -0.5), result("bad", 0.5)], "base")
    assert [r[0] for r in rows[1:]] == ["good", "base", "bad"]
    good = rows[1]
    assert good[3].startswith("-0.") and "p=" in good[3]
    assert float(good[3].split("p=")[1].rstrip(")")) < 0.01
    assert rows[2][3] == "-"  # the baseline itself
    # results without per-example values (older JSON) give no table
    old = result("base", 0.0)
    for t in old.tasks.values():
        t.nlls.clear()
    assert interval_table([old], "base") is None
    assert [r[0] for r in interval_table([old, result("good", -0.5)], "base")[1:]] == ["good"]
