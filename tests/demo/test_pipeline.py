"""The demo's GenKnowSub stage on the tiny model: a plain-text corpus from the suite's
``general`` tasks, a general-knowledge expert trained into a copy of the private
library (the private library itself is left as it was), Arrow with GenKnowSub in both
variants, and their rows and sentences in the report; a rerun skips finished work."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lorashelf.cli import main
from lorashelf.demo.pipeline import GENERAL_LIBRARY, Demo, gks_rows
from lorashelf.demo.report import collect_rows
from lorashelf.demo.sentences import describe
from lorashelf.demo.suite import Suite
from lorashelf.library import Library


def _fake_bigbench(home, name, n=24):
    d = home / "data" / "bigbench" / "benchmark_tasks" / name
    d.mkdir(parents=True)
    ex = [{"input": f"Paragraph {i}: the river {name} runs past town {i}.", "target": "yes"}
          for i in range(n)]  # fmt: skip
    (d / "task.json").write_text(json.dumps({"canary": "FAKE CANARY", "examples": ex}))


def test_genknowsub_stage_adds_both_variants(tiny_library, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    for name in ("wiki", "held"):
        _fake_bigbench(home, name)
    lib = tiny_library({"alpha": ["t:a"], "beta": ["t:b"]})
    out.mkdir()
    lib.path.rename(out / "private")
    suite = Suite(name="t", description="", train=("bigbench:wiki",), heldout={"bigbench:held": "bigbench:wiki"},
                  train_steps=2, train_batch=4, train_examples=12, max_length=64, eval_limit=4,
                  general={"tasks": ["bigbench:wiki"], "texts": 10})  # fmt: skip
    calls: list[list[str]] = []

    def run(argv):
        calls.append(argv)
        return main(argv)

    demo = Demo(out=out, suite=suite, home=home, run_cli=run)
    demo.genknowsub()
    corpus = [json.loads(x) for x in (out / "general.jsonl").read_text().splitlines()]
    assert len(corpus) == 10 and all(r["canary"] == "FAKE CANARY" for r in corpus)
    assert Library.open(out / GENERAL_LIBRARY).names() == ["alpha", "beta", "general"]
    assert Library.open(out / "private").names() == ["alpha", "beta"]
    rows = [r for r in collect_rows(demo) if r.library == GENERAL_LIBRARY]
    assert [r.label for r in rows] == [label for label, _ in gks_rows(suite)]
    assert all(r.result.tasks["bigbench:held"].n == 4 for r in rows)
    assert "GenKnowSub, exact" in describe(rows[0].spec, rows[0].library)
    evals = [a for a in calls if "eval" in a]
    assert {a[a.index("--set") + 1] for a in evals} == {"gks=delta", "gks=peft"}
    n = len(calls)
    demo.genknowsub()  # finished: nothing runs again
    assert len(calls) == n


def test_sigterm_stops_a_demo_like_ctrl_c():
    """A killed long run (SIGTERM; a background job ignores SIGINT) gets a
    KeyboardInterrupt, so its stage records its time; the handler is restored after."""
    import os
    import signal

    import pytest

    from lorashelf.cli.demo import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_fewshot_stage_one_file_per_method_and_adds_only_missing(tmp_path):
    """``demo-all`` after ``demo`` in one directory runs only the few-shot methods
    ``demo`` left out: one ``fewshot`` call and one results file per method."""
    calls: list[list[str]] = []

    def run(argv):
        calls.append(argv)
        method = argv[argv.index("--methods") + 1]
        entry = {"method": method, "tasks": {}}
        path = argv[argv.index("--json") + 1]
        weights = {"t": {"alpha": 1.0}} if method == "lorahub" else {}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"methods": [entry], "lorahub_weights": weights}))
        return 0

    suite = Suite(name="t", description="", train=("bigbench:a",), heldout={"bigbench:b": "bigbench:a"},
                  fewshot_methods=("lorahub",))  # fmt: skip
    demo = Demo(out=tmp_path, suite=suite, home=tmp_path, run_cli=run)
    demo.fewshot()
    assert [a[a.index("--methods") + 1] for a in calls] == ["lorahub"]
    assert demo.fewshot_file("lorahub").name == "fewshot-lorahub.json"
    wider = Demo(out=tmp_path, suite=dataclasses.replace(suite, fewshot_methods=("lorahub", "cat")),
                 home=tmp_path, run_cli=run)  # fmt: skip
    wider.fewshot()
    assert [a[a.index("--methods") + 1] for a in calls] == ["lorahub", "cat"]
    wider.fewshot()  # both exist: nothing runs
    assert len(calls) == 2
    from lorashelf.demo.report import _lorahub_weights

    assert _lorahub_weights(wider) == (["t"], ["alpha"], [[1.0]])


def test_demo_all_is_demo_with_every_method():
    """``demo-all`` shares every task and budget with ``demo`` (so it can resume into
    ``demo``'s directory and reuse its experts and results) and leaves no method out."""
    from lorashelf.demo.suite import load_suite

    core, full = load_suite("demo"), load_suite("demo-all")
    methods = {"name", "description", "more_methods", "fewshot_methods", "general"}
    for f in dataclasses.fields(core):
        if f.name not in methods:
            assert getattr(core, f.name) == getattr(full, f.name), f.name
    assert full.more_methods is None and full.general
    assert full.fewshot_methods is not None and set(core.fewshot_methods) < set(
        full.fewshot_methods
    )
    assert core.more_methods and not core.general
