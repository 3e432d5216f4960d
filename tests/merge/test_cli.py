"""``lorashelf merge ls|run`` end to end on a tiny library."""

from __future__ import annotations

import json
import re

from lorashelf.cli import main


def test_merge_ls_lists_every_method(capsys):
    from lorashelf.merge import MERGES

    assert main(["merge", "ls"]) == 0
    out = capsys.readouterr().out
    # each method heads a row of its own: "uniform" is not found inside "uniform-delta"
    first = [m.group(1) for line in out.splitlines() if (m := re.match(r"\W{0,3}([\w-]+)", line))]
    assert all(first.count(name) == 1 for name in MERGES.names())


def test_merge_run_writes_adapter_and_adds_expert(tiny_library, tmp_path, capsys):
    lib = tiny_library({"a": ["t:a"], "b": ["t:b"]})
    out = tmp_path / "merged"
    argv = ["merge", "run", str(lib.path), "--method", "ties", "--set", "density=0.5",
            "--rank", "4", "--out", str(out), "--add", "ties-ab"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    from lorashelf.library import Library

    lib2 = Library.open(lib.path)
    card = lib2.get("ties-ab").card
    assert card["source"] == "merge" and card["tasks"] == ["t:a", "t:b"]
    assert card["extra"]["merge"]["config"] == {"density": 0.5}
    assert (
        main(["merge", "run", str(lib.path), "--method", "tie", "--out", str(tmp_path / "x")]) == 2
    )
