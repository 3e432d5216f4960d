"""The few-shot comparison: every method, on each task, over several draws of shots.

As in LoraHub's evaluation (Huang et al. 2023, arXiv 2307.13269, section 4), each seed
draws its own shots from the task's train split (and seeds the search); every method
is scored on the same held-out test split, and the table reports the mean and the best
over seeds of the accuracy and of the gold NLL. Methods that ignore the shots
(zero-shot, the uniform merge) run once per task. Scoring is injected as ``evaluate``
(the CLI passes lorashelf.evaluate's runner), so this module needs nothing to its right.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from lorashelf.compose.baselines import (
    FewShotContext,
    FewShotMethod,
    FewShotOptions,
)
from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.registry import FEWSHOT_METHODS
from lorashelf.compose.shots import draw_shots, fingerprint
from lorashelf.config import to_dict
from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError
from lorashelf.models import BaseModel

# (model, tokenizer, task) -> {"n": int, "accuracy": float, "nll": float, ...}
Evaluate = Callable[[Any, Any, Task], dict[str, Any]]
DEFAULT_METHODS = ("zero-shot", "icl", "uniform", "lorahub", "gradient", "cat", "lora")


def all_methods(table: Any = FEWSHOT_METHODS) -> tuple[str, ...]:
    """The default comparison: the paper's order first (those ``table`` has), then any
    few-shot method added later (not every merge: those are asked for by name)."""
    extra = [m for m in FEWSHOT_METHODS.names() if m not in DEFAULT_METHODS]
    return (*[m for m in DEFAULT_METHODS if m in table], *extra)


@dataclass(frozen=True)
class FewShotConfig:
    shots: int = 5
    seeds: int = 5
    methods: tuple[str, ...] = DEFAULT_METHODS
    split_seed: int = 0
    options: FewShotOptions = field(default_factory=FewShotOptions)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise LorashelfError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.methods:
            raise LorashelfError("no methods to compare; pass e.g. --methods lorahub,icl")


def run_method(spec: FewShotMethod, ctx: FewShotContext, evaluate: Evaluate) -> dict[str, Any]:
    """Build one method, score it, restore the base model (also on errors)."""
    start = time.perf_counter()
    built = spec.build(ctx)
    build = time.perf_counter() - start
    try:
        scores = evaluate(built.model, ctx.base.tokenizer, built.task)
    finally:
        built.close()
    seconds = time.perf_counter() - start
    return {**scores, "seconds": seconds, "build_seconds": build, "info": built.info}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["accuracy"] for r in runs]
    nlls = [r["nll"] for r in runs]
    builds = [r.get("build_seconds", 0.0) for r in runs]
    return {
        "mean_accuracy": sum(accs) / len(accs),
        "best_accuracy": max(accs),
        "mean_nll": sum(nlls) / len(nlls),
        "best_nll": min(nlls),
        "build_seconds": sum(builds) / len(builds),
        "runs": list(runs),
    }


def run_fewshot(
    base: BaseModel,
    experts: list[tuple[str, dict]],
    tasks: Sequence[Task],
    compose_config: ComposeConfig,
    config: FewShotConfig,
    evaluate: Evaluate,
    *,
    progress: bool = True,
    table: Any = FEWSHOT_METHODS,
) -> dict[str, Any]:
    """Run every method on every task; returns the JSON report (per task and mean).
    ``table`` maps method names to :class:`FewShotMethod` (lorashelf.methods adds the
    zero-shot ones to this package's own)."""
    specs = [table.get(m) for m in config.methods]
    n_runs = sum(config.seeds if s.seeded else 1 for s in specs) * len(tasks)
    report: dict[str, Any] = {"tasks": {}}
    with tqdm(total=n_runs, desc="fewshot", unit="run", disable=not progress) as bar:
        for task in tasks:
            shots = [
                draw_shots(task, config.shots, s, config.split_seed) for s in range(config.seeds)
            ]
            per_method = {}
            for spec in specs:
                runs = []
                for seed in range(config.seeds if spec.seeded else 1):
                    bar.set_postfix_str(f"{task.id} {spec.name} seed {seed}")
                    ctx = FewShotContext(
                        base, experts, task, shots[seed], seed, compose_config, config.options
                    )
                    run = run_method(spec, ctx, evaluate)
                    runs.append({"seed": seed, "shots": fingerprint(shots[seed]), **run})
                    bar.update()
                per_method[spec.name] = summarise(runs)
            report["tasks"][task.id] = per_method
    report["mean"] = _means(report["tasks"], [s.name for s in specs])
    report["methods"] = as_eval_results(report["tasks"], {t.id: t.kind for t in tasks})
    report["lorahub_weights"] = mean_weights(report["tasks"])
    report["config"] = {"fewshot": to_dict(config), "compose": to_dict(compose_config)}
    report["experts"] = [n for n, _ in experts]
    return report


def _means(tasks: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, dict[str, float]]:
    keys = ("mean_accuracy", "best_accuracy", "mean_nll", "best_nll", "build_seconds")
    return {
        m: {k: sum(t[m][k] for t in tasks.values()) / len(tasks) for k in keys} for m in methods
    }


def as_eval_results(
    tasks: dict[str, dict[str, Any]], kinds: dict[str, str]
) -> list[dict[str, Any]]:
    """One ``EvalResult.to_json()``-shaped entry per method (mean over seeds), so reports
    built for ``lorashelf eval`` results read these too; bests go under ``meta``."""
    methods = list(next(iter(tasks.values()))) if tasks else []
    out = []
    for m in methods:
        per_task, best = {}, {}
        for task_id, per_method in tasks.items():
            s = per_method[m]
            per_task[task_id] = {
                "n": s["runs"][0]["n"],
                "accuracy": s["mean_accuracy"],
                "nll": s["mean_nll"],
                "kind": kinds[task_id],
                "seconds": sum(r["seconds"] for r in s["runs"]),
                **per_example_means(s["runs"]),
            }
            best[task_id] = {"accuracy": s["best_accuracy"], "nll": s["best_nll"]}
        meta = {"aggregate": "mean over seeds", "seeds": len(s["runs"]), "best": best}
        out.append({"method": m, "tasks": per_task, "meta": meta})
    return out


def per_example_means(runs: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Each test example's correctness and gold NLL averaged over the seeds (every seed
    scores the same test examples), so intervals and paired tests can resample examples;
    empty when a scorer gave no per-example values."""
    if not runs or any(not r.get("nlls") for r in runs):
        return {}
    n = len(runs)
    return {
        "correct": [
            sum(float(r["correct"][i]) for r in runs) / n for i in range(len(runs[0]["nlls"]))
        ],
        "nlls": [sum(r["nlls"][i] for r in runs) / n for i in range(len(runs[0]["nlls"]))],
    }


def mean_weights(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """LoraHub's weight per expert, averaged over seeds, per task."""
    out = {}
    for task_id, per_method in tasks.items():
        runs = per_method.get("lorahub", {}).get("runs", [])
        ws = [r["info"]["weights"] for r in runs if "weights" in r.get("info", {})]
        if ws:
            names = sorted({n for w in ws for n in w})
            out[task_id] = {n: sum(w.get(n, 0.0) for w in ws) / len(ws) for n in names}
    return out


def fewshot_table(report: dict[str, Any], title: str = "few-shot comparison") -> Any:
    """A rich table: per task and method, accuracy and gold NLL (mean and best over seeds)
    and the seconds to build the method (compose, train, merge) before evaluating it."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "method", "acc mean", "acc best", "NLL mean", "NLL best", "build s"):
        text = col in ("task", "method")
        table.add_column(
            col, justify="left" if text else "right", overflow="fold" if text else "ellipsis"
        )
    sections = [*report["tasks"].items(), ("mean", report["mean"])]
    for task_id, methods in sections:
        for i, (name, s) in enumerate(methods.items()):
            table.add_row(
                task_id if i == 0 else "",
                name,
                f"{s['mean_accuracy']:.3f}",
                f"{s['best_accuracy']:.3f}",
                f"{s['mean_nll']:.3f}",
                f"{s['best_nll']:.3f}",
                f"{s.get('build_seconds', 0.0):.1f}",
            )
        table.add_section()
    return table
