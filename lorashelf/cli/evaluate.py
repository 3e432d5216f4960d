"""``lorashelf eval``: score a model (or a library method) on tasks; table + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on tasks (accuracy, gold NLL)")
    p.add_argument(
        "--model",
        default=None,
        help="known model, local dir, .gguf or hub id (default: smollm2-135m, or the library's base)",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated task ids, e.g. bigbench:sports_understanding",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--split", default="test", help="train, valid, test or all (default: test)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--max-examples", type=int, default=None, help="cap examples read per task before splitting"
    )
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument("--json", type=Path, default=None, help="write results JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from lorashelf.config import write_json_atomic
    from lorashelf.data import load_task
    from lorashelf.errors import LorashelfError
    from lorashelf.evaluate.runner import EvalConfig, evaluate
    from lorashelf.evaluate.table import print_results
    from lorashelf.models import DEFAULT_MODEL, load_base
    from lorashelf.runtime import resolve_dtype

    task_ids = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not task_ids:
        raise LorashelfError("--tasks is empty; pass e.g. --tasks bigbench:sports_understanding")
    tasks = [load_task(t, home=args.home, max_examples=args.max_examples) for t in task_ids]
    dtype = resolve_dtype(args.dtype, args.device)
    base = load_base(args.model or DEFAULT_MODEL, home=args.home, dtype=dtype, device=args.device)
    cfg = EvalConfig(
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat=args.chat,
    )
    result = evaluate(base.model, base.tokenizer, tasks, cfg, method="base")
    result.meta.update(
        {"model": base.name, "base_id": base.base_id, "dtype": str(dtype).removeprefix("torch.")}
    )
    print_results([result], title=f"{base.name} on {len(tasks)} task(s), split {args.split}")
    if args.json:
        write_json_atomic(args.json, result.to_json())
        print(f"wrote {args.json}")
    return 0
