"""``lorashelf train TASK [TASK ...] --library DIR``: one LoRA expert per task, or one joint.

Thin handler over :func:`lorashelf.jobs.train.train_many`: experts already in the
library are skipped (rerun to resume), the library is created for the model if it
does not exist, and a summary table ends the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import (
    float_range,
    int_range,
    nonempty,
    nonneg_int,
    positive_float,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train LoRA experts (one per task, or --joint) into a library")
    p.add_argument(
        "tasks", nargs="+", metavar="TASK", help="task ids, e.g. bigbench:sports_understanding"
    )
    p.add_argument("--library", type=Path, required=True, help="library dir (created if missing)")
    p.add_argument(
        "--model", default=None, help="base model (default: the library's, else smollm2-135m)"
    )
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 200)")
    p.add_argument(
        "--epochs", type=positive_float, default=None, help="train for N epochs instead of --steps"
    )
    p.add_argument("--rank", type=positive_int, default=4)
    p.add_argument(
        "--alpha", type=positive_float, default=None, help="LoRA alpha (default 2 * rank)"
    )
    p.add_argument("--dropout", type=float_range(0.0, 0.99), default=0.0)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument(
        "--schedule", default="linear", help="linear, cosine or constant (after warm-up)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--max-length", type=int_range(2), default=512, help="tokens; prompts cut from the left"
    )
    p.add_argument(
        "--max-valid",
        type=nonneg_int,
        default=200,
        help="validation examples per task for the valid loss",
    )
    p.add_argument(
        "--target-modules",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated module names, or all-linear",
    )
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument(
        "--init-seed", type=int, default=0, help="LoRA A init seed; keep one per library (MBC)"
    )
    p.add_argument(
        "--split-seed", type=int, default=0, help="train/valid/test split (as eval's --seed)"
    )
    p.add_argument("--train-on", default="train", help="split to train on: train or all")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp16, fp32")
    p.add_argument("--joint", metavar="NAME", default=None, help="one expert NAME on all tasks")
    p.add_argument("--name", type=nonempty, default=None, help="expert name for a single task")
    p.add_argument("--runner", default="local", help="local (one loaded model) or ray")
    p.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="cap examples read per task before splitting",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace):
    from lorashelf.train.config import TrainConfig, parse_targets

    steps = args.steps if args.steps is not None or args.epochs is not None else 200
    return TrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=parse_targets(args.target_modules),
        lr=args.lr,
        schedule=args.schedule,
        steps=steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_valid=args.max_valid,
        seed=args.seed,
        init_seed=args.init_seed,
        split_seed=args.split_seed,
        train_on=args.train_on,
        dtype=args.dtype,
        chat=args.chat,
    )


def library_base(path: Path) -> str | None:
    from lorashelf.library import Library

    if not (path / "library.json").exists():
        return None
    with Library.open(path) as lib:
        return lib.base_model


def print_summary(results, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    table = Table(title=title)
    for col in ("expert", "status", "steps", "train loss", "valid loss", "time", "tokens/s"):
        left = col in ("expert", "status")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for r in results:
        trained = r.status == "trained"
        table.add_row(
            r.name,
            r.status,
            str(r.steps) if trained else "-",
            fmt(r.train_loss),
            fmt(r.valid_loss),
            f"{r.seconds:.1f}s" if trained else "-",
            f"{r.tokens_per_second:.0f}" if trained else "-",
        )
    Console().print(table)


def cmd_train(args: argparse.Namespace) -> int:
    from lorashelf.jobs.train import train_many
    from lorashelf.models import DEFAULT_MODEL

    config = config_from_args(args)
    model = args.model or library_base(args.library) or DEFAULT_MODEL
    results = train_many(
        model,
        args.tasks,
        args.library,
        config,
        runner=args.runner,
        home=args.home,
        device=str(args.device),
        joint=args.joint,
        name=args.name,
        max_examples=args.max_examples,
        progress=not args.quiet,
    )
    for r in results:
        if r.status == "skipped":
            print(f"skipped {r.name}: already in {args.library}")
    trained = sum(r.status == "trained" for r in results)
    print_summary(results, f"{trained} trained, {len(results) - trained} skipped -> {args.library}")
    return 0
