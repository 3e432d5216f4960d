"""``lorashelf eval`` end to end on a tiny local model, and its user errors."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_writes_table_and_json(eval_home, tiny_model_dir, tmp_path, capsys):
    out_json = tmp_path / "res.json"
    rc, out, _ = run(
        capsys,
        "--home",
        eval_home,
        "eval",
        "--model",
        tiny_model_dir,
        "--dtype",
        "fp32",
        "--tasks",
        "bigbench:plausible,bigbench:capitals",
        "--split",
        "all",
        "--json",
        out_json,
    )
    assert rc == 0
    assert "bigbench:plausible" in out and "gold NLL" in out
    data = json.loads(out_json.read_text())
    assert data["method"] == "base"
    assert set(data["tasks"]) == {"bigbench:plausible", "bigbench:capitals"}
    for res in data["tasks"].values():
        assert res["n"] > 0 and 0.0 <= res["accuracy"] <= 1.0 and res["nll"] > 0
    mean = sum(r["accuracy"] for r in data["tasks"].values()) / 2
    assert data["mean_accuracy"] == pytest.approx(mean)


@pytest.mark.parametrize(
    "tasks, needle",
    [
        ("bigbench:capitols", "did you mean: capitals"),
        ("bigbench:broken", "broken"),
        ("bigbench:empty", "no examples"),
        ("nosuchsource:x", "unknown"),
        ("", "--tasks"),
    ],
)
def test_bad_tasks_exit_2_with_one_line(eval_home, tiny_model_dir, capsys, tasks, needle):
    rc, _, err = run(
        capsys, "--home", eval_home, "eval", "--model", tiny_model_dir, "--tasks", tasks
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorashelf: error:")
    assert needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("model", ["/no/such/model/dir", "smollm3-135m", "/tmp/x.gguf"])
def test_missing_model_exit_2(eval_home, capsys, model):
    rc, _, err = run(
        capsys, "--home", eval_home, "eval", "--model", model, "--tasks", "bigbench:plausible"
    )
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
