"""The demo's GenKnowSub stage on the tiny model: a plain-text corpus from the suite's
``general`` tasks, a general-knowledge expert trained into a copy of the private
library (the private library itself is left as it was), Arrow with GenKnowSub in both
variants, and their rows and sentences in the report; a rerun skips finished work."""

from __future__ import annotations

import json

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
