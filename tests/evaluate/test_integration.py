"""Integration: the real SmolLM2 on a real BIG-bench task fetched by our own command."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main

pytestmark = pytest.mark.slow


def test_eval_real_model_on_sports_understanding(real_home, ensure_bigbench, tmp_path, capsys):
    ensure_bigbench(["sports_understanding"])
    out = tmp_path / "eval.json"
    argv = [
        "--home",
        str(real_home),
        "eval",
        "--model",
        "smollm2-135m",
        "--tasks",
        "bigbench:sports_understanding",
        "--limit",
        "24",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert "bigbench:sports_understanding" in capsys.readouterr().out
    res = json.loads(out.read_text())["tasks"]["bigbench:sports_understanding"]
    assert res["n"] == 24
    # a 2-way task: the real model is neither broken (all wrong) nor scoring garbage
    assert 0.2 <= res["accuracy"] <= 1.0
    assert 0.0 < res["nll"] < 20.0
