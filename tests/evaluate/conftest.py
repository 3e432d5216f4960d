"""Fixtures for evaluation: a cache home holding the BIG-bench fixture tasks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bigbench" / "benchmark_tasks"


@pytest.fixture
def eval_home(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES, tmp_path / "data" / "bigbench" / "benchmark_tasks")
    return tmp_path
