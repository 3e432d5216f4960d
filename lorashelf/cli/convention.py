"""The one CLI convention, as helpers every verb uses.

- The library is the first positional argument of every verb that reads or writes
  one (``lorashelf eval LIB ...``, ``lorashelf train LIB --tasks ...``).
- Tasks are ``--tasks a,b`` everywhere, a single-task verb included.
- ``--json PATH`` writes the machine-readable result (``-`` for stdout).
- Exit codes: 0 ok, 1 "checked and found a problem" (``library verify``), 2 usage error.

Old spellings (``--library DIR``, ``--from DIR``, ``--task T``, a bare ``--json``
that printed to stdout) keep working for one release and print a deprecation line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError


def deprecated(old: str, new: str) -> None:
    print(
        f"lorashelf: warning: {old} is deprecated and will be removed; use {new}", file=sys.stderr
    )


def add_library_arg(
    p: argparse.ArgumentParser, *, required: bool = True, old: str = "--library"
) -> None:
    """``LIB`` as the first positional argument, with the old ``--library`` flag kept."""
    p.add_argument(
        "library_pos",
        metavar="LIB",
        type=Path,
        nargs=None if required and old is None else "?",
        default=None,
        help="the library directory" + ("" if required else " (optional)"),
    )
    if old:
        p.add_argument(old, dest="library_flag", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(_library_required=required, _library_old=old)


def library_of(args: argparse.Namespace) -> Path | None:
    """The library the user named, positionally or with the deprecated flag."""
    pos, flag = getattr(args, "library_pos", None), getattr(args, "library_flag", None)
    old = getattr(args, "_library_old", "--library")
    if pos is not None and flag is not None and pos != flag:
        raise LorashelfError(f"two libraries given ({pos} and {old} {flag}); pass one")
    if flag is not None:
        deprecated(f"{old} DIR", "the library as the first argument")
    lib = pos if pos is not None else flag
    if lib is None and getattr(args, "_library_required", False):
        raise LorashelfError("pass the library directory as the first argument")
    return lib


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json PATH`` (``-`` = stdout); a bare ``--json`` still means stdout, deprecated."""
    p.add_argument(
        "--json",
        nargs="?",
        const="<bare>",
        default=None,
        metavar="PATH",
        type=_json_path,
        help=f"write {what} as JSON to PATH ('-' for stdout)",
    )


def _json_path(text: str) -> str:
    """``-``, the bare-flag marker, or a path outside any library (refused inside one)."""
    from lorashelf.cli.args import output_path

    return text if text in ("-", "<bare>") else str(output_path(text))


def json_target(args: argparse.Namespace) -> str | None:
    """``None`` (no JSON), ``"-"`` (stdout) or a path."""
    target = getattr(args, "json", None)
    if target == "<bare>":
        deprecated("a bare --json", "--json - (stdout) or --json PATH")
        return "-"
    return target


def emit_json(args: argparse.Namespace, payload: Any) -> bool:
    """Write ``payload`` where ``--json`` says; returns whether JSON was asked for."""
    from lorashelf.config import write_json_atomic

    target = json_target(args)
    if target is None:
        return False
    if target == "-":
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        write_json_atomic(target, payload)
        print(f"wrote {target}", file=sys.stderr)
    return True


def task_list(value: str | None, flag: str = "--tasks") -> list[str]:
    """``a,b`` -> ``[a, b]``; refuses an empty list."""
    tasks = [t.strip() for t in (value or "").split(",") if t.strip()]
    if not tasks:
        raise LorashelfError(f"{flag} is empty; pass e.g. {flag} bigbench:sports_understanding")
    return tasks


def one_task(args: argparse.Namespace) -> str:
    """A single-task verb's task: ``--tasks T`` (or the deprecated ``--task T``)."""
    old = getattr(args, "task", None)
    if old is not None:
        deprecated("--task T", "--tasks T")
    tasks = task_list(args.tasks if args.tasks is not None else old)
    if len(tasks) != 1:
        raise LorashelfError(f"this verb takes one task; got {len(tasks)}: {', '.join(tasks)}")
    return tasks[0]
