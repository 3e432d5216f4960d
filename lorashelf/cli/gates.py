"""``lorashelf gates train|ls``: PHATGOOSE gates for a library's experts (arXiv 2402.05859).

``train`` trains the sigmoid gates of every expert that has none yet, on the expert's
own card tasks (train split, the split seed it was trained with), and saves each as
soon as it is done, so rerunning resumes; ``ls`` shows which experts have gates.
Thin handlers over :mod:`lorashelf.route.gates` and :mod:`lorashelf.route.gate_store`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import int_range, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gates", help="PHATGOOSE gates of a library's experts: train, ls")
    verbs = p.add_subparsers(dest="gates_verb", metavar="ACTION", required=True)

    t = verbs.add_parser("train", help="train the gates of experts that have none (resumable)")
    t.add_argument("dir", type=Path, help="library directory")
    t.add_argument("--experts", default=None, help="comma-separated names (default: all)")
    t.add_argument("--model", default=None, help="base model (default: the library's)")
    t.add_argument("--dtype", default="auto", help="model dtype: auto, bf16, fp16, fp32")
    t.add_argument("--steps", type=positive_int, default=100, help="gate training steps per expert")
    t.add_argument("--lr", type=positive_float, default=5e-3, help="learning rate (AdamW)")
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--max-length", type=int_range(2), default=512, help="tokens per example")
    t.add_argument("--seed", type=int, default=0, help="data order seed")
    t.add_argument("--compute-dtype", default="auto", help="autocast dtype: auto, bf16, fp16, fp32")
    t.add_argument(
        "--max-examples", type=positive_int, default=None, help="cap each task's examples"
    )
    t.add_argument("--overwrite", action="store_true", help="retrain experts that have gates")
    t.set_defaults(func=cmd_train)

    v = verbs.add_parser("ls", help="which experts have PHATGOOSE gates")
    v.add_argument("dir", type=Path, help="library directory")
    v.set_defaults(func=cmd_ls)


def cmd_train(args: argparse.Namespace) -> int:
    from lorashelf.library import Library
    from lorashelf.route.gates import GateTrainConfig, train_library_gates
    from lorashelf.runtime import resolve_dtype

    config = GateTrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, dtype=args.compute_dtype,
    )  # fmt: skip
    names = [n.strip() for n in args.experts.split(",") if n.strip()] if args.experts else None
    library = Library.open(args.dir)
    reports = train_library_gates(
        library, config, home=args.home, device=args.device,
        dtype=resolve_dtype(args.dtype, args.device), names=names, model=args.model,
        overwrite=args.overwrite, max_examples=args.max_examples,
    )  # fmt: skip
    trained = [r for r in reports if r.status == "trained"]
    for r in trained:
        s = r.stats
        line = f"{r.name}: loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} in {s['steps']} steps"
        print(line + (f" (warning: {r.note})" if r.note else ""))
    skipped = len(reports) - len(trained)
    print(f"trained gates for {len(trained)} expert(s), {skipped} already had them")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorashelf.errors import LorashelfError
    from lorashelf.library import Library
    from lorashelf.route.gate_store import adapter_checksum, gates_dir, gates_path, load_gates

    library = Library.open(args.dir)
    directory = gates_dir(library.path)
    table = Table(title=f"PHATGOOSE gates in {directory}")
    for col in ("expert", "gates", "steps", "loss first", "loss last"):
        table.add_column(col)
    have = 0
    for expert in library:
        checksum = adapter_checksum(expert)
        row = [expert.name, "missing", "", "", ""]
        if gates_path(directory, checksum).is_file():
            try:
                s = load_gates(directory, checksum, expert=expert.name).meta.get("stats", {})
            except LorashelfError:
                row[1] = "corrupt"
            else:
                have += 1
                row[1:] = ["ok", str(s.get("steps", "")), _fmt(s.get("loss_first"))]
                row.append(_fmt(s.get("loss_last")))
        table.add_row(*row)
    Console().print(table)
    print(f"{have} of {len(library)} experts have gates")
    return 0


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ""
