"""Integration: the real BIG-bench sdist (reused from ~/.cache/lorashelf/downloads
when it is there; otherwise downloaded, 358 MB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorashelf.cli import main
from lorashelf.data import list_tasks, load_task

REAL = Path.home() / ".cache" / "lorashelf" / "downloads" / "bigbench-1.0.0.tar.gz"


@pytest.mark.slow
def test_real_pull_only_sports_understanding(tmp_path: Path, capsys) -> None:
    if REAL.is_file() and not REAL.with_name(REAL.name + ".part").exists():
        (tmp_path / "downloads").mkdir()
        (tmp_path / "downloads" / REAL.name).symlink_to(REAL)
    argv = ["--home", str(tmp_path), "data", "pull", "bigbench", "--only", "sports_understanding"]
    assert main(argv) == 0
    assert "bigbench: 1 tasks" in capsys.readouterr().out
    task = load_task("bigbench:sports_understanding", home=tmp_path)
    assert task.kind == "mc" and len(task.examples) == 986
    assert "canary GUID" in task.canary
    ex = task.examples[0]
    assert ex.prompt.startswith("Determine whether the following statement or statements are")
    assert ex.prompt.endswith("\nPlausible/implausible?")
    assert set(ex.options) == {" plausible", " implausible"}
    assert [t.id for t in list_tasks(tmp_path)] == ["bigbench:sports_understanding"]
