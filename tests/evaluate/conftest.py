"""Fixtures for evaluation: a cache home holding the BIG-bench fixture tasks and a
tiny random model saved as a local transformers directory (so the CLI can load it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bigbench" / "benchmark_tasks"


@pytest.fixture
def eval_home(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES, tmp_path / "data" / "bigbench" / "benchmark_tasks")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
