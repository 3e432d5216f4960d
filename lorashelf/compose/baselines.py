"""The few-shot methods LoraHub is compared with, each turning shots into a model to score.

Huang et al. 2023 (arXiv 2307.13269, Table 1) set LoraHub against zero-shot, in-context
learning with the same shots, and gradient-based tuning on them; we add Adam on the
LoraHub weights themselves, which isolates the search from the parametrisation, and
every zero-shot method of the library (uniform, TIES, Arrow, ...: lorashelf.methods
adds them to the table ``fewshot`` compares). A method is a function
``build(ctx) -> Built`` wrapped in a :class:`FewShotMethod` and listed in
:mod:`lorashelf.compose.registry`; the
returned model is scored like any other (lorashelf.evaluate), on the returned task
(in-context learning rewrites the prompts), then ``close()`` restores the base model.
``seeded=False`` marks methods that ignore the shots (evaluated once per task).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.lorahub import compose
from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError
from lorashelf.lora import attach
from lorashelf.models import BaseModel


@dataclass(frozen=True)
class FewShotOptions:
    """Options of the baselines: the LoRA trained on the shots, the ICL separator."""

    lora_steps: int = 100
    lora_lr: float = 1e-3
    icl_separator: str = "\n\n"


@dataclass
class FewShotContext:
    """Everything a method may use for one (task, seed)."""

    base: BaseModel
    experts: list[tuple[str, dict]]  # the candidate experts, fp32 on the model's device
    task: Task
    shots: tuple[Example, ...]
    seed: int
    compose: ComposeConfig
    options: FewShotOptions = field(default_factory=FewShotOptions)


@dataclass
class Built:
    """A model ready to score on ``task``; ``close()`` restores the base model."""

    model: nn.Module
    task: Task
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FewShotMethod:
    name: str
    summary: str
    build: Callable[[FewShotContext], Built]
    seeded: bool = True


def zero_shot(ctx: FewShotContext) -> Built:
    return Built(ctx.base.model, ctx.task)


def icl_task(task: Task, shots: Sequence[Example], separator: str = "\n\n") -> Task:
    """``task`` with every prompt preceded by the solved shots (prompt + answer each)."""
    prefix = "".join(f"{s.prompt}{s.target}{separator}" for s in shots)
    examples = tuple(dataclasses.replace(ex, prompt=prefix + ex.prompt) for ex in task.examples)
    return dataclasses.replace(task, examples=examples)


def in_context(ctx: FewShotContext) -> Built:
    return Built(ctx.base.model, icl_task(ctx.task, ctx.shots, ctx.options.icl_separator))


def _composed(ctx: FewShotContext, config: ComposeConfig) -> Built:
    result = compose(ctx.base.model, ctx.base.tokenizer, ctx.experts, ctx.shots, config)
    handle = attach(ctx.base.model, [("composed", result.factors)], weights=[1.0])
    info = {"weights": result.weight_map, "loss": result.loss, "seconds": result.seconds}
    return Built(ctx.base.model, ctx.task, handle.detach, info)


def lorahub(ctx: FewShotContext) -> Built:
    return _composed(ctx, dataclasses.replace(ctx.compose, seed=ctx.seed))


def gradient(ctx: FewShotContext) -> Built:
    config = dataclasses.replace(ctx.compose, seed=ctx.seed, optimizer="adam")
    return _composed(ctx, config)


def lora_on_shots(ctx: FewShotContext) -> Built:
    try:
        from lorashelf.library import read_lora_factors
        from lorashelf.train import TrainConfig, train_expert
    except ImportError as e:
        raise LorashelfError(
            f"the lora baseline needs lorashelf.train ({e}); drop 'lora'"
        ) from None
    fs = ctx.experts[0][1]
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in fs}))
    config = TrainConfig(
        rank=max(f.rank for f in fs.values()),
        target_modules=targets,
        steps=ctx.options.lora_steps,
        lr=ctx.options.lora_lr,
        batch_size=len(ctx.shots),
        seed=ctx.seed,
        train_on="all",
        chat=ctx.compose.chat,
    )
    shots_task = Task(id=f"{ctx.task.id}#shots", examples=ctx.shots, kind=ctx.task.kind)
    with tempfile.TemporaryDirectory(prefix="lorashelf-fewshot-lora-") as tmp:
        out = Path(tmp) / "adapter"
        res = train_expert(ctx.base, [shots_task], config, out_dir=out, progress=False, valid=[])
        device = next(ctx.base.model.parameters()).device
        factors = read_lora_factors(out, device=device)
    handle = attach(ctx.base.model, [("lora", factors)], weights=[1.0])
    info = {"train_loss": res.train_loss, "steps": res.steps, "seconds": res.seconds}
    return Built(ctx.base.model, ctx.task, handle.detach, info)


ZERO_SHOT = FewShotMethod("zero-shot", "the base model alone", zero_shot, seeded=False)
ICL = FewShotMethod("icl", "in-context learning: the shots before each test prompt", in_context)
LORAHUB = FewShotMethod(
    "lorahub", "LoraHub: gradient-free search of one weight per expert", lorahub
)
GRADIENT = FewShotMethod("gradient", "Adam on the LoraHub weights through the same loss", gradient)
LORA = FewShotMethod(
    "lora", "a LoRA trained from scratch on the shots (lorashelf.train)", lora_on_shots
)
