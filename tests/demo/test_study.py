"""The study pipeline end to end on the tiny model and a miniature suite of fake BIG-bench
tasks: it writes the report and results JSON, an interrupted run resumes without
redoing finished work, ``--stage`` reruns one stage; the claims function on synthetic
results; and the suite builder's rule."""

from __future__ import annotations

import json
import random

import pytest

from lorashelf.cli import main
from lorashelf.demo.make_study_suite import Candidate, Rule, select
from lorashelf.demo.study import Study
from lorashelf.demo.study_report import ARROW, BASE, claim_verdicts, verdict
from lorashelf.demo.suite import family_of, load_suite

CANARY = "FAKE CANARY for tests 0000"


def _write_task(root, name: str, op: str, n: int = 30) -> None:
    rng = random.Random(name)
    examples = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        good = {"add": a + b, "sub": a - b, "mul": a * b, "max": max(a, b)}[op]
        wrong = good + rng.choice([1, 2, -1])
        examples.append({"input": f"{a} {op} {b}", "target_scores": {str(good): 1, str(wrong): 0}})
    d = root / name
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"canary": CANARY, "examples": examples}))


@pytest.fixture
def mini_suite(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    root = home / "data" / "bigbench" / "benchmark_tasks"
    ops = {"arith/add": "add", "arith/sub": "sub", "arith/mul": "mul", "calc/add": "add",
           "calc/max": "max", "calc/mul": "mul", "other": "max"}  # fmt: skip
    for name, op in ops.items():
        _write_task(root, name, op)
    suite = {
        "name": "mini-study",
        "description": "fake tasks",
        "canary": CANARY,
        "model": str(tiny_model_dir),
        "train": ["bigbench:arith/add", "bigbench:arith/sub", "bigbench:calc/add", "bigbench:calc/max"],
        "families": {"arith": ["bigbench:arith/add", "bigbench:arith/sub"],
                     "calc": ["bigbench:calc/add", "bigbench:calc/max"]},
        "heldout": {"bigbench:arith/mul": "bigbench:arith/add"},
        "unseen": ["bigbench:other"],
        "train_examples": 30, "train_steps": 2, "train_batch": 4, "max_length": 64,
        "gate_steps": 1, "eval_limit": 4, "shots": 2, "seeds": 1, "lorahub_budget": 2,
        "study": {"cluster_ks": [2], "retrain_ks": [2], "agreement_seeds": 1,
                  "fewshot_methods": ["lorahub"],
                  "skip_methods": ["wudi", "core-space", "dare-linear", "dare-ties", "ties",
                                   "uniform-delta", "task-arithmetic", "retrieval", "best-expert:shots",
                                   "phatgoose"],
                  "cut": "test suite: most merges skipped"},
    }  # fmt: skip
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(suite))
    return home, path


def test_study_end_to_end_resume_and_stage(mini_suite, tmp_path, capsys):
    home, suite_path = mini_suite
    out, report = tmp_path / "out", tmp_path / "rep"
    calls = []

    def interrupted(argv):  # dies at the 4th evaluation, as a killed run would
        if "eval" in argv:
            calls.append(argv)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return main(argv)

    study = Study(out=out, suite=load_suite(str(suite_path)), home=home, run_cli=interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run()
    done = sorted((out / "results").rglob("*.json"))
    assert len(done) == 5  # base and shared on both tasks, the oracle on the seen one
    assert not (out / "fewshot").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}
    stages = json.loads((out / "stages.json").read_text())
    assert stages["evaluate"]["runs"][0]["finished"] is False
    assert stages["train"]["runs"][0]["finished"] is True

    argv = ["--home", str(home), "demo", "--suite", str(suite_path), "--out", str(out),
            "--report", str(report)]  # fmt: skip
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished results kept
    results = json.loads((report / "results.json").read_text())
    assert results["canary"] == CANARY
    assert set(results["groups"]) == {"seen", "unseen", "all"}
    methods = {r["method"] for r in results["summary"]["all"]}
    assert {"base", "shared", "private + arrow", "private + uniform", "mbc-k2 + arrow",
            "mbc-center-k2 + uniform", "random-k2 + arrow", "best-expert:test",
            "few-shot lorahub"} <= methods  # fmt: skip
    oracle = next(r for r in results["summary"]["all"] if r["method"] == "oracle")
    assert oracle["tasks"] == 1  # seen families only
    nlls = [r["nll"][0] for r in results["summary"]["all"]]
    assert nlls == sorted(nlls)
    assert all(r["nll"][1] <= r["nll"][0] <= r["nll"][2] for r in results["summary"]["all"])
    assert {c["id"] for c in results["claims"]} == {"a", "b", "c", "d"}
    assert claim_verdicts(results) == results["claims"]
    mbc = [c for c in results["claims"] if c["id"] == "b"]
    assert [c["a"] for c in mbc] == ["mbc-k2 + arrow", "mbc-k2 + uniform"]
    assert all(c["groups"]["all"]["verdict"] != "not measured" for c in mbc)
    shared = next(c for c in results["claims"] if c["id"] == "c")
    assert (shared["a"], shared["b"]) == ("private + arrow", "shared")
    assert set(results["stages"]) == {
        "pull",
        "train",
        "cluster",
        "build",
        "gates",
        "evaluate",
        "fewshot",
    }
    assert results["stages"]["evaluate"]["seconds"] > 0
    assert -1 <= results["cosines"]["centered"] < results["cosines"]["raw"] <= 1
    assert {"agreement-k2", "agreement-center-k2"} <= set(results["agreement"])
    md = (report / "report.md").read_text()
    assert (
        "## Claims" in md
        and "(a) Arrow beats uniform merging" in md
        and "test suite: most merges skipped" in md
    )
    assert (report / "methods.png").exists() and (report / "ari.png").exists()
    assert "## Gold NLL per held-out task" in md

    from lorashelf.library import Library

    created = {
        n: Library.open(out / "private").get(n).created
        for n in Library.open(out / "private").names()
    }
    few = out / "fewshot" / "bigbench__other.json"
    before = few.stat().st_mtime_ns
    assert main([*argv, "--stage", "fewshot"]) == 0
    assert few.stat().st_mtime_ns > before  # that stage was redone ...
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # ... and no other
    assert {n: Library.open(out / "private").get(n).created for n in created} == created
    assert len(json.loads((out / "stages.json").read_text())["fewshot"]["runs"]) == 2
    capsys.readouterr()
    assert main([*argv, "--stage", "fewshoot"]) == 2
    assert "did you mean: fewshot" in capsys.readouterr().err


def _results(a_minus_b: float, noise: float, n: int = 200) -> dict:
    """private + arrow = private + uniform + ``a_minus_b`` (+ noise) per example."""
    rng = random.Random(0)
    uniform = [rng.uniform(1, 3) for _ in range(n)]
    arrow = [b + a_minus_b + rng.gauss(0, noise) for b in uniform]
    rows = {BASE: uniform, "private + uniform": uniform, ARROW: arrow}
    per = {m: {"t1": {"nlls": v[: n // 2]}, "t2": {"nlls": v[n // 2 :]}} for m, v in rows.items()}
    return {"per_example": per, "groups": {"seen": ["t1"], "unseen": ["t2"], "all": ["t1", "t2"]}}


def test_claim_verdicts_on_synthetic_results():
    better = claim_verdicts(_results(-0.5, 0.1))
    a = next(c for c in better if c["id"] == "a")
    assert {g: v["verdict"] for g, v in a["groups"].items()} == dict.fromkeys(
        ("seen", "unseen", "all"), "holds"
    )
    test = a["groups"]["all"]["test"]
    assert test["task_wins"] == test["tasks"] > 0  # lower on every task, and counted so
    worse = next(c for c in claim_verdicts(_results(0.5, 0.1)) if c["id"] == "a")
    assert worse["groups"]["all"]["verdict"] == "does not hold"
    assert worse["groups"]["all"]["test"]["task_wins"] == 0
    noise = next(c for c in claim_verdicts(_results(0.0, 1.0)) if c["id"] == "a")
    assert noise["groups"]["all"]["verdict"] == "not distinguishable"
    missing = next(c for c in better if c["id"] == "d")  # no LoraHub results
    assert missing["groups"]["all"]["verdict"] == "not measured"
    assert verdict({"p": 0.01, "lo": -0.2, "hi": 0.1}) == "not distinguishable"


def _catalogue(n_families: int = 150) -> list[Candidate]:
    rng = random.Random(1)
    cands = []
    for f in range(n_families):
        for s in range(rng.choice([1, 1, 3, 5])):
            name = f"bigbench:fam{f}/sub{s}" if s or f % 2 else f"bigbench:fam{f}"
            cands.append(Candidate(name, rng.choice(["mc", "gen"]), rng.choice([100, 300, 800]),
                                   rng.uniform(50, 1500), rng.uniform(1, 80)))  # fmt: skip
    return cands


def test_suite_rule():
    cands = _catalogue()
    picked = select(cands, Rule())
    train, seen, unseen = picked["train"], picked["heldout"], picked["unseen"]
    assert len(train) == 64 and len(set(train)) == 64
    assert len(seen) == 6 and len(unseen) == 6
    held = [*seen, *unseen]
    assert not set(train) & set(held)
    assert all(sib in train and family_of(sib) == family_of(t) for t, sib in seen.items())
    train_families = {family_of(t) for t in train}
    assert not {family_of(t) for t in unseen} & train_families
    by_id = {c.id: c for c in cands}
    assert all(by_id[t].n >= Rule().heldout_examples for t in held)
    assert all(by_id[t].n >= Rule().min_examples and by_id[t].prompt_chars <= 1000 for t in train)
    assert select(list(reversed(cands)), Rule()) == picked  # input order does not matter
    assert select(cands, Rule(seed=1)) != picked


def test_study_suite_checks(tmp_path):
    from lorashelf.demo.study import StudyPlan
    from lorashelf.errors import LorashelfError

    shipped = load_suite("study")
    assert len(shipped.train) >= 64 and len(shipped.heldout) >= 6 and len(shipped.unseen) >= 6
    assert "canary" in shipped.canary.lower()
    bad = {"name": "x", "description": "", "train": ["bigbench:a/b"], "heldout": {},
           "unseen": ["bigbench:a/c"]}  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(LorashelfError, match="unseen tasks whose family is in training"):
        load_suite(str(path))
    with pytest.raises(LorashelfError, match="did you mean"):
        StudyPlan.from_suite({"cluster_k": [8]})
    with pytest.raises(LorashelfError, match="retrain_ks"):
        StudyPlan.from_suite({"cluster_ks": [4], "retrain_ks": [8]})
