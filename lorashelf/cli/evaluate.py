"""``lorashelf eval``: score a model, or a library reuse method, on tasks; table + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import int_range, positive_int
from lorashelf.cli.convention import add_json_arg, add_library_arg, json_target, library_of
from lorashelf.cli.options import (
    add_option_flags,
    add_set_flag,
    collect_settings,
    method_option_classes,
)


def register(sub: argparse._SubParsersAction, active: str | None = None) -> None:
    p = sub.add_parser("eval", help="evaluate a model or a library method on tasks")
    add_library_arg(p, required=False)
    p.add_argument(
        "--model",
        default=None,
        help="known model, local dir, .gguf or hub id (default: the library's base, else smollm2-135m)",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated task ids, e.g. bigbench:sports_understanding",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="at most N examples per task")
    p.add_argument("--split", default="test", help="train, valid, test or all (default: test)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=int_range(2), default=1024)
    p.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="cap examples read per task before splitting",
    )
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    add_json_arg(p)
    lib = p.add_argument_group("library methods")
    lib.add_argument(
        "--method",
        default=None,
        help="comma-separated methods (default: base, or expert:NAME with --expert)"
        + (": " + ", ".join(_method_names()) if active in (None, "eval") else ""),
    )
    lib.add_argument("--expert", default=None, help="evaluate the base model plus this one expert")
    lib.add_argument(
        "--experts", default=None, help="comma-separated subset of the library's experts"
    )
    if active in (None, "eval"):
        add_option_flags(lib, method_option_classes())
    add_set_flag(lib)
    lib.add_argument(
        "--oracle-map",
        default=None,
        help="oracle: TASK=TRAIN_TASK,... (default: each task's own expert)",
    )
    lib.add_argument(
        "--routing-report",
        type=Path,
        default=None,
        help="routers: write per-task routing weights (JSON + heatmap PNG)",
    )
    p.set_defaults(func=cmd_eval)


def _method_names() -> list[str]:
    from lorashelf.methods import method_names

    return [n + ":NAME" if n == "expert" else n for n in method_names()]


def cmd_eval(args: argparse.Namespace) -> int:
    from lorashelf.errors import LorashelfError
    from lorashelf.evaluate.session import EvalRequest, run_eval

    task_ids = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not task_ids:
        raise LorashelfError("--tasks is empty; pass e.g. --tasks bigbench:sports_understanding")
    if args.expert and args.method:
        raise LorashelfError("pass either --expert NAME or --method ..., not both")
    methods = [f"expert:{args.expert}"] if args.expert else (args.method or "base").split(",")
    oracle = dict(kv.split("=", 1) for kv in args.oracle_map.split(",")) if args.oracle_map else {}
    req = EvalRequest(
        tasks=tuple(task_ids), methods=tuple(m.strip() for m in methods if m.strip()),
        model=args.model, library=library_of(args), dtype=args.dtype, split=args.split,
        limit=args.limit, seed=args.seed, batch_size=args.batch_size,
        max_length=args.max_length, max_examples=args.max_examples, chat=args.chat,
        experts=tuple(args.experts.split(",")) if args.experts else None,
        settings=collect_settings(args), oracle=oracle,
        json_out=json_target(args), routing_report=args.routing_report,
    )  # fmt: skip
    run_eval(req, home=args.home, device=args.device)
    return 0
