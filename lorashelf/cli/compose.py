"""``lorashelf compose`` (LoraHub: a new expert from a few shots of a task) and
``lorashelf fewshot`` (LoraHub against its baselines over several draws of shots)."""

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
from lorashelf.cli.convention import add_json_arg, emit_json, one_task
from lorashelf.cli.options import add_config_flags, config_values

# LoraHub uses 5-20 shots; each costs memory per candidate, so thousands run out of memory
MAX_SHOTS = 256


COMPOSE_HELP = {
    "preselect": "keep the N best experts first",
    "preselect_by": "loss or arrow",
    "budget": "loss evaluations (adam: steps)",
    "mix": "params (LoraHub) or output",
    "optimizer": "cma, ngopt or adam",
    "popsize": "candidates asked per generation",
    "l1": "weight of the mean |w| penalty",
    "loss": "reference, token or example",
    "chunk": "candidates scored per forward pass",
    "chat": "wrap prompts in the chat template",
    "lora_dtype": "LoRA branch while scoring: float32 or model",
    "layout": "shots per candidate: auto, prefix (shared prompt prefix once) or padded",
}
COMPOSE_TYPES = {
    "preselect": positive_int,
    "budget": positive_int,
    "popsize": positive_int,
    "l1": float_range(0.0),
    "chunk": positive_int,
}


def _compose_options(p: argparse.ArgumentParser, full: bool) -> None:
    g = p.add_argument_group("composition (LoraHub; defaults from ComposeConfig)")
    g.add_argument(
        "--shots",
        type=int_range(1, MAX_SHOTS),
        default=5,
        help="examples drawn from the train split",
    )
    g.add_argument("--experts", default=None, help="comma-separated experts (default: all)")
    if full:  # ComposeConfig's package imports torch: only for the verb that runs
        from lorashelf.compose.config import ComposeConfig

        add_config_flags(g, ComposeConfig, COMPOSE_HELP, COMPOSE_TYPES)
    g.add_argument("--dtype", default="auto", help="load dtype: auto, bf16, fp16, fp32")
    g.add_argument(
        "--max-examples", type=positive_int, default=None, help="cap examples read per task"
    )


def register(sub: argparse._SubParsersAction, active: str | None = None) -> None:
    p = sub.add_parser("compose", help="LoraHub: compose the library's experts for a task")
    p.add_argument("dir", type=Path, help="library directory (the expert is added to it)")
    p.add_argument("--tasks", default=None, help="the task id, e.g. bigbench:logical_deduction/...")
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # deprecated spelling
    p.add_argument("--seed", type=int, default=0, help="shots draw and search seed")
    p.add_argument(
        "--name", type=nonempty, default=None, help="expert name (default: lorahub__TASK__sSEED)"
    )
    p.add_argument("--save-rank", type=nonneg_int, default=None, help="0: exact; K: SVD to rank K")
    p.add_argument("--overwrite", action="store_true", help="replace an expert of that name")
    p.add_argument("--allow-mixed", action="store_true", help="allow a rank the library lacks")
    add_json_arg(p, "the result summary")
    _compose_options(p, active in (None, "compose"))
    p.set_defaults(func=cmd_compose)

    f = sub.add_parser("fewshot", help="compare LoraHub with few-shot baselines on tasks")
    f.add_argument("dir", type=Path, help="library directory")
    f.add_argument("--tasks", required=True, help="comma-separated task ids")
    f.add_argument("--seeds", type=positive_int, default=5, help="draws of shots (seeds 0..N-1)")
    f.add_argument("--methods", default=None, help="comma-separated (default: all registered)")
    f.add_argument(
        "--limit", type=positive_int, default=None, help="at most N test examples per task"
    )
    f.add_argument("--batch-size", type=positive_int, default=16, help="evaluation batch size")
    f.add_argument("--max-length", type=int_range(2), default=1024, help="evaluation max tokens")
    f.add_argument(
        "--lora-steps", type=positive_int, default=100, help="lora baseline: training steps"
    )
    f.add_argument(
        "--lora-lr", type=positive_float, default=1e-3, help="lora baseline: learning rate"
    )
    add_json_arg(f, "the report")
    _compose_options(f, active in (None, "fewshot"))
    f.set_defaults(func=cmd_fewshot)


def _config(args: argparse.Namespace, seed: int = 0):
    from lorashelf.compose import ComposeConfig

    experts = (
        tuple(e.strip() for e in args.experts.split(",") if e.strip()) if args.experts else None
    )
    save_rank = getattr(args, "save_rank", None)
    return ComposeConfig(
        experts=experts, seed=seed, save_rank=save_rank, **config_values(args)
    )  # fmt: skip


def _quiet() -> None:
    """Entry-point choice: nevergrad hands scipy's COBYLA (from a worker thread) a final
    radius that scipy corrects with a warning on every run; it changes nothing."""
    import warnings

    warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)


def _load(args: argparse.Namespace, library):
    from lorashelf.models import load_base
    from lorashelf.runtime import resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    return load_base(library.base_model, home=args.home, dtype=dtype, device=args.device)


def cmd_compose(args: argparse.Namespace) -> int:
    from lorashelf.compose import OPTIMISERS, compose, draw_shots, save_composition
    from lorashelf.data import load_task
    from lorashelf.errors import LorashelfError
    from lorashelf.library import Library, check_name, safe_name

    _quiet()
    config = _config(args, seed=args.seed)
    OPTIMISERS.get(config.optimizer)  # a typo fails before the model loads
    lib = Library.open(args.dir)
    task = load_task(one_task(args), home=args.home, max_examples=args.max_examples)
    name = check_name(args.name or f"lorahub__{safe_name(task.id)}__s{args.seed}")
    if name in lib and not args.overwrite:
        raise LorashelfError(
            f"an expert named {name!r} already exists in {lib.path}; pass --name or --overwrite"
        )
    shots = draw_shots(task, args.shots, args.seed)
    base = _load(args, lib)
    result = compose(base.model, base.tokenizer, lib, shots, config, progress=True)
    expert = save_composition(
        result, lib, name, tasks=[task.id], allow_mixed=args.allow_mixed, overwrite=args.overwrite
    )
    print_weights(result, title=f"{expert.name}: {task.id}, {len(shots)} shots, seed {args.seed}")
    extra = expert.card["extra"]
    print(
        f"added {expert.name} to {lib.path} (rank {extra['rank']}, loss {result.loss:.4f}, "
        f"{result.evaluations} evaluations in {result.seconds:.1f} s"
        + (
            f", truncation error {extra['relative_truncation_error']:.3g}"
            if extra["truncated_to"]
            else ""
        )
        + ")"
    )
    emit_json(args, result.summary())
    return 0


def print_weights(result, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("expert")
    table.add_column("weight", justify="right")
    for name, w in sorted(result.weight_map.items(), key=lambda kv: -abs(kv[1])):
        table.add_row(name, f"{w:+.4f}")
    Console().print(table)


def cmd_fewshot(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lorashelf.compose import resolve_experts
    from lorashelf.compose.baselines import FewShotOptions
    from lorashelf.compose.fewshot import FewShotConfig, all_methods, fewshot_table, run_fewshot
    from lorashelf.data import load_task
    from lorashelf.errors import LorashelfError
    from lorashelf.evaluate.runner import EvalConfig, evaluate_task
    from lorashelf.library import Library

    _quiet()
    task_ids = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not task_ids:
        raise LorashelfError("--tasks is empty; pass e.g. --tasks bigbench:logical_deduction/...")
    from lorashelf.methods import fewshot_methods

    table = fewshot_methods()
    methods = (
        tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.methods
        else all_methods(table)
    )
    for m in methods:
        table.get(m)  # unknown names fail before any slow loading, with suggestions
    options = FewShotOptions(lora_steps=args.lora_steps, lora_lr=args.lora_lr)
    fs = FewShotConfig(shots=args.shots, seeds=args.seeds, methods=methods, options=options)
    config = _config(args)
    lib = Library.open(args.dir)
    tasks = [load_task(t, home=args.home, max_examples=args.max_examples) for t in task_ids]
    base = _load(args, lib)
    experts = resolve_experts(lib, config.experts, args.device)
    eval_cfg = EvalConfig(
        split="test", limit=args.limit, seed=fs.split_seed, batch_size=args.batch_size,
        max_length=args.max_length, chat=config.chat,
    )  # fmt: skip

    def evaluate(model, tokenizer, task):
        r = evaluate_task(model, tokenizer, task, eval_cfg)
        return {"n": r.n, "accuracy": r.accuracy, "nll": r.nll, "correct": r.correct,
                "nlls": r.nlls}  # fmt: skip

    report = run_fewshot(base, experts, tasks, config, fs, evaluate, progress=True, table=table)
    title = f"{args.shots} shots x {args.seeds} seeds, {len(experts)} experts"
    Console().print(fewshot_table(report, title=title))
    emit_json(args, report)
    return 0
