"""End to end: ``lorashelf data pull|ls|show`` in a temporary home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorashelf.cli import main


def run(home: Path, *args: str) -> int:
    return main(["--home", str(home), "--device", "cpu", "data", *args])


def test_pull_ls_show(tmp_path, make_sdist, capsys) -> None:
    sdist = make_sdist()
    assert run(tmp_path, "pull", "bigbench", "--sdist", str(sdist), "--only", "colors", "cap*") == 0
    assert "bigbench: 2 tasks in" in capsys.readouterr().out
    assert (tmp_path / "data" / "bigbench" / "benchmark_tasks" / "colors" / "task.json").is_file()

    assert run(tmp_path, "ls") == 0
    out = capsys.readouterr().out
    assert "bigbench:colors" in out and "bigbench:capitals" in out and "2 tasks" in out

    assert run(tmp_path, "ls", "--source", "bigbench", "--kind", "gen", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["kind"], r["n_examples"]) for r in rows] == [
        ("bigbench:capitals", "gen", 5)
    ]

    assert run(tmp_path, "show", "bigbench:colors", "--n", "5", "--split", "all") == 0
    out = capsys.readouterr().out
    assert "bigbench:colors: mc, 5 examples" in out
    assert "What color is the sky?" in out and "' blue'" in out
    assert out.count("all example") == 5


def test_ls_on_an_empty_home_says_how_to_pull(tmp_path, capsys) -> None:
    assert run(tmp_path, "ls") == 0
    out = capsys.readouterr().out
    assert "0 tasks" in out and "lorashelf data pull bigbench" in out


def test_bad_input_exits_2_with_one_line(tmp_path, make_sdist, capsys) -> None:
    run(tmp_path, "pull", "bigbench", "--sdist", str(make_sdist()), "--only", "colors")
    capsys.readouterr()
    assert run(tmp_path, "show", "bigbench:colours") == 2
    err = capsys.readouterr().err
    assert err.startswith("lorashelf: error: unknown BIG-bench task 'colours'")
    assert "did you mean: colors" in err and len(err.strip().splitlines()) == 1
    assert run(tmp_path, "show", "bigbench:colors", "--split", "dev") == 2
    assert "unknown split 'dev'" in capsys.readouterr().err
    assert run(tmp_path, "pull", "bigbench", "--sdist", str(tmp_path / "none.tar.gz")) == 2
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "ls", "--kind", "chat")
    assert exit_info.value.code == 2
