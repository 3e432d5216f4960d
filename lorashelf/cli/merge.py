"""``lorashelf merge ls|run``: list the weight-space merges; merge a library's experts
into a new PEFT adapter (optionally added back to the library as an expert)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import output_path, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="weight-space merges: ls, run")
    verbs = p.add_subparsers(dest="merge_verb", metavar="ACTION", required=True)
    ls = verbs.add_parser("ls", help="list merge methods")
    ls.set_defaults(func=cmd_ls)
    run = verbs.add_parser("run", help="merge experts into a PEFT adapter")
    run.add_argument("library", type=Path)
    run.add_argument("--method", required=True, help="uniform, uniform-delta, ties")
    run.add_argument("--experts", default=None, help="comma-separated subset (default: all)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method config, e.g. density=0.2",
    )
    run.add_argument(
        "--rank",
        type=positive_int,
        default=None,
        help="SVD-truncate to this rank (needed for ties)",
    )
    run.add_argument("--out", type=output_path, required=True, help="output PEFT adapter directory")
    run.add_argument(
        "--add", default=None, metavar="NAME", help="also add the merge to the library under NAME"
    )
    run.set_defaults(func=cmd_run)


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorashelf.merge import MERGES

    table = Table(title="merge methods")
    table.add_column("method")
    table.add_column("config")
    table.add_column("what it does")
    for name in MERGES.names():
        m = MERGES.get(name)
        table.add_row(name, m.config_cls.__name__, m.summary)
    Console().print(table)
    return 0


def _parse_sets(pairs: list[str]) -> dict[str, object]:
    from lorashelf.errors import LorashelfError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise LorashelfError(f"--set {pair!r}: use KEY=VALUE, e.g. --set density=0.2")
        try:
            out[key] = float(raw) if "." in raw or "e" in raw.lower() else int(raw)
        except ValueError:
            out[key] = raw
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from lorashelf.library import Library
    from lorashelf.merge import merge

    lib = Library.open(args.library)
    names = args.experts.split(",") if args.experts else lib.names()
    experts = [lib.get(n).lora_factors() for n in names]
    merged = merge(experts, args.method, _parse_sets(args.set) or None, progress=True)
    err = merged.save_peft(args.out, lib.base_model, rank=args.rank)
    print(f"wrote {args.out} ({args.method} of {len(names)} experts; truncation error {err:.4f})")
    if args.add:
        card = {"tasks": sorted({t for n in names for t in lib.get(n).tasks}), "source": "merge",
                "extra": {"merge": {"method": args.method, "experts": names, "config": _parse_sets(args.set), "truncation_error": err}}}  # fmt: skip
        lib.add(args.out, name=args.add, card=card)
        print(f"added {args.add} to {lib.path}")
    return 0
