"""``lorashelf library init|import|export|ls|show|rm|verify``: manage a library of experts.

Thin handlers over :mod:`lorashelf.library`. Nothing heavy is imported at module level
and ``ls``/``show``/``rm``/``verify`` never import torch, so listing 10,000 experts
takes well under a second. Large listings skip rich's table layout (about 1 ms a row)
for plain aligned columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorashelf.cli.args import nonempty, positive_int
from lorashelf.cli.convention import add_json_arg, emit_json
from lorashelf.errors import LorashelfError

RICH_MAX_ROWS = 300
LS_COLUMNS = ("name", "tasks", "rank", "modules", "source", "derived", "created")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("library", help="a library of LoRA experts: init, import, ls, ...")
    verbs = p.add_subparsers(dest="library_verb", metavar="ACTION", required=True)

    v = verbs.add_parser("init", help="create a library for one base model")
    v.add_argument("dir", type=Path)
    v.add_argument("--base", required=True, help="base model (known name, hub id or path)")
    v.add_argument("--target-modules", default=None, help="e.g. q_proj,v_proj (default: first)")
    v.add_argument(
        "--rank", type=positive_int, default=None, help="LoRA rank (default: the first's)"
    )
    v.add_argument("--allow-mixed", action="store_true", help="allow mixed modules and ranks")
    v.set_defaults(func=cmd_init)

    v = verbs.add_parser("import", help="add a PEFT adapter dir or Hugging Face repo id")
    v.add_argument("dir", type=Path)
    v.add_argument("src", help="PEFT adapter dir or hub repo id (org/name)")
    v.add_argument("--all", action="store_true", help="every adapter subfolder of src")
    v.add_argument(
        "--name", type=nonempty, default=None, help="expert name (default: from the source)"
    )
    v.add_argument("--task", action="append", default=None, help="task id (repeatable)")
    v.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    v.add_argument("--allow-mixed", action="store_true", help="accept other modules/ranks")
    v.add_argument("--overwrite", action="store_true", help="replace an expert of that name")
    v.add_argument(
        "--allow-base", action="store_true", help="accept an adapter naming another base model"
    )
    v.set_defaults(func=cmd_import)

    v = verbs.add_parser("export", help="write an expert (or --all) as plain PEFT dirs")
    v.add_argument("dir", type=Path)
    v.add_argument("name", nargs="?", default=None)
    v.add_argument("out", type=Path, nargs="?", default=None)
    v.add_argument("--all", action="store_true", help="every expert, one subfolder each")
    v.add_argument("--out", type=Path, default=None, dest="out_dir", help="with --all: DIR")
    v.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    v.set_defaults(func=cmd_export)

    v = verbs.add_parser("ls", help="list experts")
    v.add_argument("dir", type=Path)
    v.add_argument("--task", default=None, help="only experts trained on this task")
    v.add_argument("--source", default=None, help="only experts of this source (train, ...)")
    add_json_arg(v)
    v.set_defaults(func=cmd_ls)

    v = verbs.add_parser("show", help="an expert's card and adapter config")
    v.add_argument("dir", type=Path)
    v.add_argument("name")
    add_json_arg(v)
    v.set_defaults(func=cmd_show)

    v = verbs.add_parser("rm", help="remove experts")
    v.add_argument("dir", type=Path)
    v.add_argument("names", nargs="+", metavar="NAME")
    v.set_defaults(func=cmd_rm)

    v = verbs.add_parser("verify", help="check every file's checksum and the index")
    v.add_argument("dir", type=Path)
    v.add_argument("--progress", action="store_true", help="show a progress bar")
    v.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the index from the expert dirs, drop damaged derived files",
    )
    v.set_defaults(func=cmd_verify)

    for parser in verbs.choices.values():
        parser.set_defaults(needs_runtime=False)  # none of these touches a device


def cmd_init(args: argparse.Namespace) -> int:
    from lorashelf.library import Library
    from lorashelf.library.shapes import cached_base_config

    existed = (args.dir / "library.json").exists()
    targets = args.target_modules.split(",") if args.target_modules else None
    lib = Library.open(
        args.dir, create=True, base_model=args.base, target_modules=targets, rank=args.rank,
        allow_mixed=args.allow_mixed, base_config=cached_base_config(args.base, args.home),
    )  # fmt: skip
    state = "already exists" if existed else "created"
    print(f"library {args.dir} {state} (base {lib.base_model}, {len(lib)} experts)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from lorashelf.library import Library, import_adapter, import_all

    lib = Library.open(args.dir)
    if args.all:
        if args.name or args.task:
            raise LorashelfError("--all names experts from their subfolders; drop --name/--task")
        experts = import_all(lib, args.src, revision=args.revision, overwrite=args.overwrite,
                             allow_mixed=args.allow_mixed)  # fmt: skip
        print(f"imported {len(experts)} experts from {args.src} into {args.dir}")
        return 0
    card = {"tasks": args.task} if args.task else None
    expert = import_adapter(
        lib, args.src, name=args.name, card=card, revision=args.revision,
        overwrite=args.overwrite, allow_mixed=args.allow_mixed, allow_base=args.allow_base,
    )  # fmt: skip
    modules = ",".join(expert.target_modules)
    print(f"imported {expert.name} (rank {_rank(expert)}, {modules}) into {args.dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lorashelf.library import Library, export_expert, export_library

    lib = Library.open(args.dir)
    if args.all:
        if args.name or args.out or not args.out_dir:
            raise LorashelfError("write `library export LIB --all --out DIR` (no NAME)")
        paths = export_library(lib, args.out_dir, overwrite=args.overwrite)
        print(f"exported {len(paths)} experts to {args.out_dir}")
        return 0
    out = args.out or args.out_dir
    if not args.name or out is None:
        raise LorashelfError(
            "write `library export LIB NAME OUT` or `library export LIB --all --out DIR`"
        )
    out = export_expert(lib.get(args.name), out, overwrite=args.overwrite)
    print(f"exported {args.name} to {out}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from lorashelf.library import Library
    from lorashelf.library.artefacts import summary

    lib = Library.open(args.dir)
    experts = lib.filter(task=args.task, source=args.source)
    derived = {n: summary(a) for n, a in _artefacts(lib, experts).items()}
    rows = [_ls_row(e, derived.get(e.name, {})) for e in experts]
    if emit_json(args, [_ls_json(e, derived.get(e.name, {})) for e in experts]):
        pass
    elif not rows:
        print(f"no experts in {args.dir}" + (" match" if args.task or args.source else ""))
    elif len(rows) <= RICH_MAX_ROWS:
        _print_rich(rows, f"{args.dir} ({lib.base_model})")
    else:
        _print_plain(rows)
        print(f"{len(rows)} experts in {args.dir} ({lib.base_model})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from lorashelf.library import Library

    lib = Library.open(args.dir)
    expert = lib.get(args.name)
    artefacts = _artefacts(lib, [expert]).get(expert.name, [])
    doc = {"path": str(expert.path), **expert.card, "adapter_config": expert.peft_config,
           "derived": [a.to_json() for a in artefacts]}  # fmt: skip
    if emit_json(args, doc):
        return 0
    for key, value in doc.items():
        if key == "derived":
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if key == "adapter_config":
            keep = (
                "peft_type",
                "r",
                "lora_alpha",
                "use_rslora",
                "target_modules",
                "base_model_name_or_path",
            )  # noqa: E501
            text = json.dumps({k: value.get(k) for k in keep})
        print(f"{key:>17}: {text}")
    _print_derived(artefacts)
    return 0


def _artefacts(lib: Any, experts: list[Any]) -> dict[str, list[Any]]:
    """Each expert's derived artefacts (prototypes, gates, embeddings), from file names
    and sidecars: no tensor is read."""
    from lorashelf.library.artefacts import expert_artefacts

    sums = {e.name: e.files.get("adapter_model.safetensors", "") for e in experts}
    return expert_artefacts(lib.path, sums)


def _print_derived(artefacts: list[Any]) -> None:
    if not artefacts:
        print(f"{'derived':>17}: none (Arrow prototypes, PHATGOOSE gates and retrieval "
              "embeddings appear here once a method has computed them)")  # fmt: skip
        return
    print(f"{'derived':>17}: {len(artefacts)} artefact(s); `library verify` checks their tensors")
    width = max(len(a.label) for a in artefacts)
    for a in artefacts:
        why = "" if a.status == "ok" else f" (made for adapter {a.adapter_sha256[:12]}...)"
        print(f"{'':>19}{a.label:<{width}}  {a.file}  {_size(a.bytes)}  {a.status}{why}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def cmd_rm(args: argparse.Namespace) -> int:
    from lorashelf.library import Library

    lib = Library.open(args.dir)
    for name in args.names:
        lib.get(name)  # all names must exist before any is removed
    for name in args.names:
        lib.remove(name)
        print(f"removed {name}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lorashelf.library import Library

    lib = Library.open(args.dir)
    if args.repair:
        n = lib.rebuild_index()
        print(f"repaired {args.dir}: index rebuilt from {n} expert dirs")
    problems = lib.verify(progress=args.progress)
    for problem in problems:
        print(f"problem ({problem.kind}): {problem}")
    if problems:  # 1: checked and found a problem (2 is for usage errors)
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"ok: {len(lib)} experts in {args.dir}, every file matches its checksum")
    return 0


def _rank(expert: Any) -> str:
    return str(expert.rank) if expert.rank is not None else "mixed"


def _ls_json(expert: Any, derived: dict[str, str]) -> dict[str, Any]:
    """One expert for ``ls --json``, in JSON types (rank: an int, or null when mixed;
    derived: ``{"arrow": "ok", "phatgoose": "stale"}``)."""
    return {
        "name": expert.name,
        "tasks": list(expert.tasks),
        "rank": expert.rank,
        "modules": list(expert.target_modules),
        "source": expert.source,
        "derived": derived,
        "created": expert.created,
    }


def _derived_cell(derived: dict[str, str]) -> str:
    return ",".join(k if v == "ok" else f"{k}({v})" for k, v in sorted(derived.items()))


def _ls_row(expert: Any, derived: dict[str, str]) -> dict[str, Any]:
    return {
        "name": expert.name,
        "tasks": ",".join(expert.tasks),
        "rank": _rank(expert),
        "modules": ",".join(expert.target_modules),
        "source": expert.source or "",
        "derived": _derived_cell(derived),
        "created": expert.created or "",
    }


def _print_rich(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    min_widths = {"name": 16, "tasks": 10, "rank": 4, "modules": 8, "source": 6, "derived": 7,
                  "created": 10}  # fmt: skip
    for col in LS_COLUMNS:
        table.add_column(col, overflow="fold", min_width=min_widths[col])
    for row in rows:
        table.add_row(*(str(row[c]) for c in LS_COLUMNS[:-1]), _short_time(row["created"]))
    Console().print(table)


def _short_time(iso: str) -> str:
    return iso[:16].replace("T", " ")


def _print_plain(rows: list[dict[str, Any]], max_width: int = 48) -> None:
    def cut(text: str) -> str:
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    cells = [[cut(str(r[c])) for c in LS_COLUMNS[:-1]] + [_short_time(r["created"])] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(LS_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(LS_COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    sys.stdout.write("\n".join(lines) + "\n")
