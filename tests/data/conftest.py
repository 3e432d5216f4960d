"""Fixtures for the data tests: a home holding the BIG-bench-format fixture tasks and
a builder for tiny BIG-bench sdists (``bigbench-1.0.0/bigbench/benchmark_tasks/...``)."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bigbench" / "benchmark_tasks"
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


@pytest.fixture
def bb_home(tmp_path: Path) -> Path:
    """A cache root whose BIG-bench dir holds the fixture tasks (as after a pull)."""
    shutil.copytree(FIXTURES, tmp_path / "data" / "bigbench" / "benchmark_tasks")
    return tmp_path


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def make_sdist(tmp_path: Path) -> Callable[..., Path]:
    """``make_sdist(extra={member: bytes})`` -> a tar.gz laid out like bigbench-1.0.0."""

    def make(extra: dict[str, bytes] | None = None, name: str = "bigbench-1.0.0.tar.gz") -> Path:
        path = tmp_path / "sdists" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tf:
            _add_bytes(tf, "bigbench-1.0.0/setup.py", b"# not a task\n")
            _add_bytes(tf, "bigbench-1.0.0/bigbench/api/task.json", b"{}")
            _add_bytes(tf, PREFIX + "prog/task.py", b"# a programmatic task\n")
            _add_bytes(tf, PREFIX + "colors/README.md", b"# not extracted\n")
            for f in sorted(FIXTURES.rglob("task.json")):
                _add_bytes(tf, PREFIX + f.relative_to(FIXTURES).as_posix(), f.read_bytes())
            for member, data in (extra or {}).items():
                _add_bytes(tf, member, data)
        return path

    return make
