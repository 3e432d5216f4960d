"""Inputs that used to end in a traceback or unbounded work: one line, exit 2."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_hf_dataset_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc, err = run(capsys, "--home", tmp_path, "eval", "--tasks", "hf:nobody/none?input=q&target=a")
    assert rc == 2 and err.count("\n") == 1 and "hf:nobody/none" in err and "Traceback" not in err


def test_malformed_local_hf_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b"}\n{not json\n')
    rc, err = run(capsys, "--home", tmp_path, "eval", "--tasks", f"hf:{bad}?input=q&target=a")
    # datasets logs its own parse error; lorashelf's answer is the one last line
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("lorashelf: error:") and "cannot load it" in last
    assert "Traceback" not in err


def test_pickled_model_dir_is_refused_before_loading(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    task = tmp_path / "t.jsonl"
    task.write_text('{"input": "a", "target": "b"}\n')
    rc, err = run(capsys, "--home", tmp_path, "eval", "--model", d, "--tasks", f"jsonl:{task}")
    assert rc == 2 and "pickled weights (pytorch_model.bin)" in err and "safetensors" in err


@pytest.mark.parametrize("field", ["input", "target"])
def test_huge_row_is_refused_with_its_size(tmp_path, capsys, field):
    row = {"input": "q", "target": "a", field: "x" * 1_200_000}
    task = tmp_path / "big.jsonl"
    task.write_text(json.dumps(row) + "\n")
    rc, err = run(capsys, "--home", tmp_path, "eval", "--tasks", f"jsonl:{task}")
    assert rc == 2 and "1,200,00" in err and "characters" in err
