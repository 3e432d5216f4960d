"""The best single expert, as a baseline every reuse method should be read against.

"Pause Recycling LoRAs" (2025) warns that a routing or merging method that beats the
base model may still lose to simply picking the right single expert. Two versions,
both choosing by the gold continuations' mean per-token NLL (the mean over examples
of each example's per-token mean, the ``nll`` that ``eval`` reports):

- ``best-expert:test`` picks, per task, the expert with the lowest NLL on the very
  examples being evaluated (``eval``'s split, seed and limit). It has seen the test
  set: an **upper bound** on what choosing one expert can do, never a fair baseline.
- ``best-expert:shots`` picks by the NLL on ``n_shots`` (default 5) examples drawn from
  the task's train split exactly as ``fewshot`` draws them with the evaluation seed
  (lorashelf.compose.shots.draw_shots): a fair few-shot baseline for LoraHub & co.

The NLLs are computed with the few-shot scorer (lorashelf.compose.scoring: prompt and
target tokenised together, one expert per pass), the chosen expert is attached alone
for the task and detached after it; ``info`` records each task's choice and every
expert's NLL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError
from lorashelf.lora import attach

SELECTIONS = ("test", "shots")
CHUNK = 16  # examples per scoring pass


@dataclass(frozen=True)
class BestExpertConfig:
    """``n_shots``: how many train examples ``best-expert:shots`` chooses on."""

    n_shots: int = 5

    def __post_init__(self) -> None:
        if self.n_shots < 1:
            raise LorashelfError(f"best-expert n_shots must be >= 1, got {self.n_shots}")


def expert_nlls(
    model: nn.Module,
    tokenizer: Any,
    experts: list[tuple[str, dict]],
    examples: Sequence[Example],
    *,
    chat: bool = False,
    max_length: int | None = None,
) -> list[float]:
    """Each expert's mean per-token NLL of the examples' gold targets (``target``, or
    the answer option of a multiple-choice example)."""
    from lorashelf.compose.scoring import PopulationScorer
    from lorashelf.compose.shots import encode_shots

    gold = [_gold(ex) for ex in examples]
    totals = torch.zeros(len(experts), dtype=torch.float64)
    eye = torch.eye(len(experts), device=next(model.parameters()).device)
    for start in range(0, len(gold), CHUNK):
        part = gold[start : start + CHUNK]
        shots = encode_shots(tokenizer, part, max_length=max_length, eos=False, chat=chat)
        scorer = PopulationScorer(
            model, experts, shots, mix="output", loss="example", lora_dtype=None
        )
        try:
            with torch.no_grad():
                for e in range(len(experts)):
                    totals[e] += float(scorer.forward(eye[e : e + 1])[0]) * len(part)
        finally:
            scorer.close()
    return (totals / len(gold)).tolist()


def _gold(ex: Example) -> Example:
    if ex.options and ex.answer is not None:
        return Example(prompt=ex.prompt, target=ex.options[ex.answer])
    return ex


def build_best_expert(model: nn.Module, ctx: Any, config: BestExpertConfig, arg: str) -> Any:
    """``Prepared`` for ``best-expert:test`` or ``best-expert:shots`` (lorashelf.methods)."""
    from lorashelf.methods import Prepared

    if arg not in SELECTIONS:
        raise LorashelfError(
            "use --method best-expert:test (an upper bound: chosen on the test examples) or "
            "best-expert:shots (chosen on 5 train shots: a fair few-shot baseline)"
        )
    cfg = ctx.evaluation
    if ctx.tokenizer is None or cfg is None:
        raise LorashelfError(
            f"best-expert:{arg} scores every expert on the task; run it through `lorashelf "
            "eval` (MethodContext needs tokenizer= and evaluation=)"
        )
    names = ctx.names()
    experts = ctx.factors(model, names)
    chosen: dict[str, str] = {}
    nlls: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def on_task(task: Task) -> Iterator[None]:
        examples = _selection_examples(task, arg, cfg, config)
        scores = expert_nlls(
            model, ctx.tokenizer, experts, examples, chat=cfg.chat, max_length=cfg.max_length
        )
        best = min(range(len(names)), key=lambda i: scores[i])
        chosen[task.id] = names[best]
        nlls[task.id] = dict(zip(names, scores))
        with attach(model, [experts[best]], weights=[1.0]):
            yield

    label = "upper bound: chosen on the test examples" if arg == "test" else (
        f"chosen on {config.n_shots} train shots (seed {cfg.seed})"
    )  # fmt: skip
    info = {"best_expert": chosen, "selection": label, "selection_nll": nlls}
    return Prepared(model=model, on_task=on_task, info=info)


def _selection_examples(
    task: Task, arg: str, cfg: Any, config: BestExpertConfig
) -> tuple[Example, ...]:
    if arg == "test":
        examples = task.splits(seed=cfg.seed).get(cfg.split)
        return examples[: cfg.limit] if cfg.limit is not None else examples
    from lorashelf.compose.shots import draw_shots

    n_train = len(task.splits(seed=cfg.seed).train)
    if n_train < config.n_shots:
        raise LorashelfError(
            f"best-expert:shots draws {config.n_shots} shots but task {task.id} has {n_train} "
            "train examples; pass --set n_shots=N with N <= that, or use a larger task"
        )
    return draw_shots(task, config.n_shots, seed=cfg.seed, split_seed=cfg.seed)
