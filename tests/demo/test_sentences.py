"""The demo's Methods section is written from the numbers it is given."""

from __future__ import annotations

from lorashelf.demo.sentences import Row, methods_text, sentence
from lorashelf.evaluate.runner import EvalConfig, EvalResult, TaskResult


def result(method: str, accs: list[float], nlls: list[float]) -> EvalResult:
    tasks = {
        f"bigbench:t{i}": TaskResult(n=10, accuracy=a, nll=n, kind="mc", seconds=1.0)
        for i, (a, n) in enumerate(zip(accs, nlls))
    }
    return EvalResult(method=method, tasks=tasks, config=EvalConfig())


BASE = result("base", [0.2, 0.5, 0.1], [2.0, 1.0, 3.0])
UPPER = result("best", [0.6, 0.6, 0.4], [1.0, 0.8, 1.0])


def test_sentence_counts_wins_and_names_where_it_does_not_help():
    ties = Row("private + ties", "ties", "private", result("t", [0.4, 0.3, 0.1], [1.5, 1.2, 2.0]))
    text = sentence(ties, BASE, UPPER)
    assert text.startswith("private + ties: trim to top-density")  # "TIES: " not repeated
    assert "lower gold NLL than base on 2/3 held-out tasks (mean 1.567 against 2.000)" in text
    assert "higher accuracy on 1/3 and lower on 1/3" in text
    assert "it closes 41% of the NLL gap" in text  # (2.0 - 1.567) / (2.0 - 0.933)
    assert "it does not help on t1" in text


def test_beyond_the_upper_bound_and_no_help_are_said_so():
    good = Row("x", "task-arithmetic", "private", result("x", [0.6] * 3, [0.5, 0.5, 0.5]))
    assert "beats even the best single expert chosen on test (0.933)" in sentence(good, BASE, UPPER)
    bad = Row("y", "uniform", "private", result("y", [0.0] * 3, [4.0, 4.0, 4.0]))
    assert "it helps on none of them" in sentence(bad, BASE, UPPER)


def test_section_has_one_paragraph_per_row_and_the_noise_note():
    rows = [
        Row("base", "base", None, BASE),
        Row("best expert", "best-expert:test", "private", UPPER),
        Row("CAT 5-shot", "fewshot:cat", "private", result("c", [0.3] * 3, [1.9, 0.9, 2.9])),
    ]
    text = methods_text(rows, n_examples=10)
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 4 and "steps of 0.100" in paragraphs[0]
    assert paragraphs[1] == "base: the base model alone."
    assert "upper bound" in paragraphs[0] and paragraphs[3].startswith("CAT 5-shot: CAT / LoRA")
    assert "lower gold NLL than base on 3/3" in paragraphs[3]
