"""``lorashelf merge ls|run``: list the weight-space merges; merge a library's experts
into a new PEFT adapter (optionally added back to the library as an expert)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import output_path, positive_int
from lorashelf.cli.options import (
    add_option_flags,
    add_set_flag,
    collect_settings,
    method_option_classes,
)


def register(sub: argparse._SubParsersAction, active: str | None = None) -> None:
    p = sub.add_parser("merge", help="weight-space merges: ls, run")
    verbs = p.add_subparsers(dest="merge_verb", metavar="ACTION", required=True)
    ls = verbs.add_parser("ls", help="list merge methods")
    ls.set_defaults(func=cmd_ls)
    run = verbs.add_parser("run", help="merge experts into a PEFT adapter")
    run.add_argument("library", type=Path)
    run.add_argument("--method", required=True, help="a merge method (`lorashelf merge ls`)")
    run.add_argument("--experts", default=None, help="comma-separated subset (default: all)")
    if active in (None, "merge"):
        add_option_flags(run, method_option_classes(("merge",)))
    add_set_flag(run)
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


def cmd_run(args: argparse.Namespace) -> int:
    from lorashelf.library import Library
    from lorashelf.merge import MERGES, merge
    from lorashelf.methods import Method, check_settings, make_config

    lib = Library.open(args.library)
    names = args.experts.split(",") if args.experts else lib.names()
    experts = [lib.get(n).lora_factors() for n in names]
    settings = collect_settings(args)
    spec = MERGES.get(args.method)
    check_settings([Method(args.method, "merge", spec.summary, None, spec.config_cls)], settings)
    config = make_config(Method(args.method, "merge", "", None, spec.config_cls), settings)
    merged = merge(experts, args.method, config, progress=True)
    err = merged.save_peft(args.out, lib.base_model, rank=args.rank)
    print(f"wrote {args.out} ({args.method} of {len(names)} experts; truncation error {err:.4f})")
    if args.add:
        card = {"tasks": sorted({t for n in names for t in lib.get(n).tasks}), "source": "merge",
                "extra": {"merge": {"method": args.method, "experts": names, "config": settings, "truncation_error": err}}}  # fmt: skip
        lib.add(args.out, name=args.add, card=card)
        print(f"added {args.add} to {lib.path}")
    return 0
