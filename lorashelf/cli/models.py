"""``lorashelf model pull|ls``: fetch and list base models."""

from __future__ import annotations

import argparse

from lorashelf.cli.convention import add_json_arg, emit_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="base models: pull, ls")
    verbs = p.add_subparsers(dest="model_verb", metavar="ACTION", required=True)
    pull = verbs.add_parser("pull", help="convert a known model into the local cache")
    pull.add_argument("name", nargs="?", default=None, help="default: smollm2-135m")
    pull.set_defaults(func=cmd_pull)
    ls = verbs.add_parser("ls", help="list known models and whether they are cached")
    add_json_arg(ls, "the list")
    ls.set_defaults(func=cmd_ls)


def cmd_pull(args: argparse.Namespace) -> int:
    from lorashelf.models import DEFAULT_MODEL, pull

    path = pull(args.name or DEFAULT_MODEL, args.home)
    print(f"{args.name or DEFAULT_MODEL}: {path}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorashelf.models import list_cached

    rows = list_cached(args.home)
    if emit_json(args, rows):
        return 0
    table = Table(title="models")
    for col in ("name", "base_id", "cached", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(r[c] for c in ("name", "base_id", "cached", "path")))
    Console().print(table)
    return 0
