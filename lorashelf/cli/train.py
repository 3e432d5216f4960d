"""``lorashelf train LIB --tasks a,b``: one LoRA expert per task, or one joint.

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
from lorashelf.cli.convention import deprecated, task_list
from lorashelf.cli.options import add_config_flags, config_values

TRAIN_HELP = {
    "steps": "optimizer steps (or --epochs)",
    "epochs": "train for N epochs instead of --steps",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (unset: 2 * rank)",
    "dropout": "LoRA dropout",
    "lr": "learning rate",
    "schedule": "linear, cosine or constant (after warm-up)",
    "batch_size": "examples per step",
    "max_length": "tokens; prompts cut from the left",
    "max_valid": "validation examples per task for the valid loss",
    "seed": "data order seed",
    "init_seed": "LoRA A init seed; keep one per library (MBC)",
    "split_seed": "train/valid/test split (as eval's --seed)",
    "train_on": "split to train on: train or all",
    "chat": "wrap prompts in the model's chat template",
    "dtype": "load dtype of the base model (training computes in it): auto, bf16, fp16, fp32",
}
TRAIN_TYPES = {
    "steps": positive_int,
    "epochs": positive_float,
    "rank": positive_int,
    "alpha": positive_float,
    "dropout": float_range(0.0, 0.99),
    "lr": positive_float,
    "batch_size": positive_int,
    "max_length": int_range(2),
    "max_valid": nonneg_int,
}


def register(sub: argparse._SubParsersAction, active: str | None = None) -> None:
    p = sub.add_parser("train", help="train LoRA experts (one per task, or --joint) into a library")
    p.add_argument("items", nargs="+", metavar="LIB", help="the library dir (created if missing)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids, one expert each")
    p.add_argument("--library", type=Path, default=None, help=argparse.SUPPRESS)  # deprecated
    p.add_argument(
        "--model", default=None, help="base model (default: the library's, else smollm2-135m)"
    )
    g = p.add_argument_group("training (defaults from TrainConfig)")
    if active in (None, "train"):
        from lorashelf.train.config import TrainConfig

        add_config_flags(g, TrainConfig, TRAIN_HELP, TRAIN_TYPES)
    g.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or all-linear (default: q_proj,k_proj,v_proj,o_proj)",
    )
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


def library_and_tasks(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """``train LIB --tasks a,b``, or the deprecated ``train a b --library LIB``."""
    from lorashelf.errors import LorashelfError

    if args.library is not None:
        deprecated("train TASK... --library LIB", "train LIB --tasks TASK,...")
        tasks = list(args.items) + (task_list(args.tasks) if args.tasks else [])
        return args.library, tasks
    if len(args.items) != 1:
        raise LorashelfError(
            "pass the library first and the tasks with --tasks: "
            f"lorashelf train LIB --tasks {','.join(args.items[1:]) or 'TASK,...'}"
        )
    return Path(args.items[0]), task_list(args.tasks)


def config_from_args(args: argparse.Namespace):
    from lorashelf.train.config import TrainConfig, parse_targets

    values = config_values(args)
    if "epochs" in values and "steps" not in values:
        values["steps"] = None  # --epochs replaces TrainConfig's default step count
    if args.target_modules is not None:
        values["target_modules"] = parse_targets(args.target_modules)
    return TrainConfig(**values)


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

    library, tasks = library_and_tasks(args)
    config = config_from_args(args)
    model = args.model or library_base(library) or DEFAULT_MODEL
    results = train_many(
        model,
        tasks,
        library,
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
            print(f"skipped {r.name}: already in {library}")
    trained = sum(r.status == "trained" for r in results)
    print_summary(results, f"{trained} trained, {len(results) - trained} skipped -> {library}")
    return 0
