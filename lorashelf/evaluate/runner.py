"""Score any model on a list of tasks: the one path every method's evaluation takes.

``evaluate`` receives a ready model (base, base + expert, merged, routed, composed)
and returns per-task accuracy and gold NLL plus their means, as JSON
``{"method", "tasks": {TASK: {"n", "accuracy", "nll"}}, "mean_accuracy", "mean_nll"}``.
Methods differ only in how the model was built, never in how it is scored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lorashelf.data.prompt import render
from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError
from lorashelf.evaluate.generate import greedy_generate
from lorashelf.evaluate.metrics import (
    check_finite_scores,
    exact_match,
    mc_correct,
    per_token_nll,
)
from lorashelf.evaluate.scoring import score_continuations


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    max_length: int = 1024
    chat: bool = False
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        # every caller (CLI, demo, Python) gets the same one-line errors
        _at_least("limit", self.limit, 1, "evaluate at least one example, or omit it for all")
        _at_least("batch_size", self.batch_size, 1, "use e.g. 16")
        _at_least("max_length", self.max_length, 2, "a prompt token and an answer token")
        _at_least("max_new_tokens", self.max_new_tokens, 1, "use e.g. 32")


def _at_least(field: str, value: int | None, low: int, hint: str) -> None:
    if value is None and field == "limit":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LorashelfError(f"{field} must be an integer >= {low}, not {value!r}; {hint}")


@dataclass
class TaskResult:
    n: int
    accuracy: float
    nll: float
    kind: str
    seconds: float
    # per example, in split order: what intervals and paired tests resample
    correct: list[bool] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    method: str
    tasks: dict[str, TaskResult]
    config: EvalConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return sum(r.accuracy for r in self.tasks.values()) / max(len(self.tasks), 1)

    @property
    def mean_nll(self) -> float:
        return sum(r.nll for r in self.tasks.values()) / max(len(self.tasks), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
            "mean_accuracy": self.mean_accuracy,
            "mean_nll": self.mean_nll,
            "config": asdict(self.config),
            "meta": self.meta,
        }


def result_from_json(data: dict[str, Any], method: str | None = None) -> EvalResult:
    """Read back ``EvalResult.to_json()`` (optionally relabelling the method)."""
    cfg = EvalConfig(**data.get("config", {}))
    tasks = {t: TaskResult(**r) for t, r in data["tasks"].items()}
    return EvalResult(
        method=method or data["method"], tasks=tasks, config=cfg, meta=data.get("meta", {})
    )


def select_examples(task: Task, cfg: EvalConfig) -> tuple[Example, ...]:
    examples = task.splits(seed=cfg.seed).get(cfg.split)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if not examples:
        raise LorashelfError(
            f"task {task.id} has no examples in split {cfg.split!r} "
            f"({len(task.examples)} in total); use --split all or a larger task"
        )
    return examples


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> TaskResult:
    start = time.perf_counter()
    examples = select_examples(task, cfg)
    prompts = [render(ex, tokenizer, cfg.chat) for ex in examples]
    if task.kind == "mc":
        pairs = [(p, o) for p, ex in zip(prompts, examples) for o in ex.options]
    else:
        pairs = [(p, ex.target) for p, ex in zip(prompts, examples)]
    scores = score_continuations(
        model, tokenizer, pairs, batch_size=cfg.batch_size, max_length=cfg.max_length
    )
    check_finite_scores(scores, f"task {task.id}")
    correct, nlls, k = [], [], 0
    for ex in examples:
        if task.kind == "mc":
            opts = scores[k : k + len(ex.options)]
            k += len(ex.options)
            assert ex.answer is not None
            correct.append(mc_correct(opts, ex.answer, ex.scores))
            nlls.append(per_token_nll(opts[ex.answer]))
        else:
            nlls.append(per_token_nll(scores[k]))
            k += 1
    if task.kind == "gen":
        budget = max(
            len(tokenizer(t)["input_ids"]) for ex in examples for t in ex.targets or (ex.target,)
        )
        preds = greedy_generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=min(cfg.max_new_tokens, budget + 4),
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )
        correct = [exact_match(p, ex.targets or (ex.target,)) for p, ex in zip(preds, examples)]
    if progress:
        progress(len(examples))
    return TaskResult(
        n=len(examples),
        accuracy=sum(correct) / len(examples),
        nll=sum(nlls) / len(nlls),
        kind=task.kind,
        seconds=time.perf_counter() - start,
        correct=[bool(c) for c in correct],
        nlls=[float(x) for x in nlls],
    )


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    cfg: EvalConfig,
    *,
    method: str = "base",
    on_task: Callable[[Task], contextlib.AbstractContextManager[Any]] | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on each task; ``on_task`` wraps each task (e.g. to record
    routing statistics, or to switch the oracle expert)."""
    total = sum(len(select_examples(t, cfg)) for t in tasks)
    results: dict[str, TaskResult] = {}
    with tqdm(total=total, desc=f"eval {method}", unit="ex", disable=not show_progress) as bar:
        for task in tasks:
            ctx = on_task(task) if on_task else contextlib.nullcontext()
            with ctx:
                results[task.id] = evaluate_task(model, tokenizer, task, cfg, bar.update)
    return EvalResult(method=method, tasks=results, config=cfg)
