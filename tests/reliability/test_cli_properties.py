"""Property: any value of the CLI's numeric and name arguments gives exit 0, or exit 2
with one line, never a traceback (``lorashelf.cli.main`` in process, fast verbs only)."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "1e309", "-0", "0x10", "nan", "--", "1_000"]),
    st.text(max_size=8),
)
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def _lines_ok(rc: int) -> None:
    assert rc in (0, 2)


@SETTINGS
@given(
    flag=st.sampled_from(["--limit", "--batch-size", "--max-length", "--max-examples"]),
    value=NUMBERS,
)
def test_eval_numbers(cli_runner, capsys, tmp_path_factory, flag, value):
    home = tmp_path_factory.getbasetemp() / "prop-home"
    # no such task: valid numbers reach the task lookup (exit 2 one line), bad ones argparse
    rc, _, err = cli_runner(capsys, home, "eval", "--tasks", "nosuch:task", flag, value)
    assert rc == 2 and (flag in err or "nosuch" in err)


@SETTINGS
@given(rank=NUMBERS, threads=st.one_of(st.none(), NUMBERS))
def test_init_rank_and_threads(cli_runner, capsys, tmp_path_factory, rank, threads):
    base = tmp_path_factory.mktemp("prop")
    head = ["--threads", threads] if threads is not None else []
    argv = [*head, "library", "init", base / "lib", "--base", "org/m", "--rank", rank]
    rc, _, _ = cli_runner(capsys, base / "home", *argv)
    _lines_ok(rc)
    assert (rc == 0) == (base / "lib" / "library.json").exists()


@SETTINGS
@given(name=st.text(max_size=140))
def test_import_names(cli_runner, capsys, tmp_path_factory, adapter_writer, tiny_shapes, name):
    base = tmp_path_factory.mktemp("prop")
    src = adapter_writer(base / "src", tiny_shapes, base="org/m")
    home = base / "home"
    assert cli_runner(capsys, home, "library", "init", base / "lib", "--base", "org/m")[0] == 0
    rc, _, _ = cli_runner(capsys, home, "library", "import", base / "lib", src, "--name", name)
    _lines_ok(rc)
