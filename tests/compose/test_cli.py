"""``lorashelf compose`` and ``lorashelf fewshot`` end to end on the tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main
from lorashelf.library import Library


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def setup(tmp_path, make_library, mc_task_file):
    return make_library(3).path, f"jsonl:{mc_task_file}", tmp_path


def test_compose_writes_an_expert_with_its_card(capsys, setup):
    lib_dir, task, tmp = setup
    rc, out, err = run(
        capsys, "--home", tmp, "--device", "cpu", "compose", lib_dir, "--tasks", task,
        "--shots", 5, "--seed", 3, "--budget", 8, "--dtype", "fp32", "--json", tmp / "r.json",
    )  # fmt: skip
    assert rc == 0, err
    name = "lorahub__jsonl__" + str(tmp / "parity.jsonl").strip("/").replace("/", "__") + "__s3"
    assert "e0" in out and "weight" in out and f"added {name}" in out
    lib = Library.open(lib_dir)
    card = lib.get(name).card
    assert card["source"] == "compose" and card["tasks"] == [task]
    assert set(card["extra"]["weights"]) == {"e0", "e1", "e2"}
    assert card["extra"]["config"]["seed"] == 3 and len(card["extra"]["trace"]) == 8
    summary = json.loads((tmp / "r.json").read_text())
    assert summary["weights"] == card["extra"]["weights"]
    # the same name again is refused before any work, with the fix
    rc, _, err = run(capsys, "--home", tmp, "--device", "cpu", "compose", lib_dir,
                     "--tasks", task, "--seed", 3, "--budget", 2, "--dtype", "fp32")  # fmt: skip
    assert rc == 2 and "already exists" in err and "--overwrite" in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--optimizer", "cmaa"], "did you mean: cma"),
        (["--shots", "40"], "fewer than 40 shots"),
        (["--mix", "both"], "mix must be one of"),
    ],
)
def test_compose_user_errors(capsys, setup, extra, needle):
    lib_dir, task, tmp = setup
    before = Library.open(lib_dir).names()
    rc, _, err = run(capsys, "--home", tmp, "--device", "cpu", "compose", lib_dir,
                     "--tasks", task, "--budget", 2, "--dtype", "fp32", *extra)  # fmt: skip
    assert rc == 2 and needle in err and err.count("\n") == 1
    assert Library.open(lib_dir).names() == before


def test_fewshot_prints_table_and_writes_json(capsys, setup):
    lib_dir, task, tmp = setup
    rc, out, err = run(
        capsys, "--home", tmp, "--device", "cpu", "fewshot", lib_dir, "--tasks", task,
        "--shots", 3, "--seeds", 2, "--limit", 4, "--budget", 4, "--popsize", 4,
        "--lora-steps", 2, "--dtype", "fp32", "--json", tmp / "fs.json",
    )  # fmt: skip
    assert rc == 0, err
    for method in ("zero-shot", "icl", "uniform", "lorahub", "gradient", "lora"):
        assert method in out
    assert "acc mean" in out and "NLL best" in out
    report = json.loads((tmp / "fs.json").read_text())
    per = report["tasks"][task]
    assert set(per) == {"zero-shot", "icl", "uniform", "lorahub", "gradient", "cat", "lora"}
    assert len(per["lorahub"]["runs"]) == 2 and len(per["zero-shot"]["runs"]) == 1
    for s in per.values():
        assert s["best_accuracy"] >= s["mean_accuracy"] and s["best_nll"] <= s["mean_nll"]
        assert all(r["n"] == 4 for r in s["runs"])
    assert set(per["lorahub"]["runs"][0]["info"]["weights"]) == {"e0", "e1", "e2"}
    # also readable as lorashelf eval results (mean over seeds), as the demo report reads it
    from lorashelf.evaluate.runner import result_from_json

    by_method = {e["method"]: result_from_json(e) for e in report["methods"]}
    assert by_method["lorahub"].tasks[task].accuracy == per["lorahub"]["mean_accuracy"]
    assert set(report["lorahub_weights"][task]) == {"e0", "e1", "e2"}
    assert Library.open(lib_dir).names() == ["e0", "e1", "e2"]  # fewshot writes no expert
