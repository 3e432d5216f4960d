"""CAT / LoRA Soups (Prabhakar et al. 2024, arXiv 2410.13025): one learnt weight per
expert per adapted module, by gradient descent on the few shots.

The gradient baseline (lorashelf.compose.gradient) learns one weight per expert, shared
by every module; CAT learns a matrix ``W [modules, E]``: module ``m`` computes
``base(x) + sum_e W[m, e] * s_e B_e A_e x`` (the paper concatenates the LoRAs, i.e.
``mix="output"``; ``ComposeConfig.mix`` chooses, as for the other few-shot methods).
The weights sit in the mixture layer as routers that return their module's row for
every token, so the shots' loss (lorashelf.compose.scoring, the same objective
``ce + l1 * mean|W|``) is differentiable in ``W`` with the model frozen. Everything
else follows the gradient baseline: start at ``1/E``, Adam with ``ComposeConfig.lr``
for ``budget`` steps, clip to ``bounds`` after each step, return the best iterate. With
``tied=True`` every module reads one shared row, which is exactly the gradient
baseline (tests/compose/test_cat.py checks the loss trajectories agree). The result is
folded into one composed LoRA per module (lorashelf.lora.combine).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from lorashelf.compose.baselines import Built, FewShotContext, FewShotMethod
from lorashelf.compose.composed import check_same_ranks
from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.gradient import adam_steps, frozen
from lorashelf.compose.scoring import PopulationScorer
from lorashelf.compose.shots import encode_shots, model_context
from lorashelf.library import LoraFactors
from lorashelf.lora import attach, combine
from lorashelf.lora.stack import Experts


class ModuleWeights(nn.Module):
    """A router returning row ``row`` of ``W`` (this module's experts) for every token."""

    def __init__(self, weights: torch.Tensor, row: int, members: torch.Tensor) -> None:
        super().__init__()
        self.weights, self.row, self.members = weights, row, members
        self.top_k: int | None = None  # dense: every expert contributes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[self.row].index_select(0, self.members.to(self.weights.device))
        return w.to(x.dtype).expand(*x.shape[:-1], w.shape[0])


def cat_search(
    model: nn.Module,
    scorer: PopulationScorer,
    config: ComposeConfig,
    *,
    tied: bool = False,
    progress: bool = False,
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """``budget`` Adam steps on per-module weights; returns the best iterate as
    ``{module: [E weights]}`` and the trace (``loss``, ``ce`` per step)."""
    modules = sorted(scorer.handle.layers)
    e = scorer.n_experts
    device = next(model.parameters()).device
    W = torch.full((1 if tied else len(modules), e), 1.0 / e, device=device, requires_grad=True)
    routers = {
        m: ModuleWeights(W, 0 if tied else i, scorer.handle.layers[m].members)
        for i, m in enumerate(modules)
    }
    scorer.handle.set_routers(routers)
    trace: list[dict[str, Any]] = []
    best: tuple[float, torch.Tensor] | None = None
    with frozen(model):
        for step, objective, ce in adam_steps(
            W, lambda: scorer.routed_loss()[0], config, desc="cat", progress=progress
        ):
            loss = float(objective.detach())
            trace.append({"eval": step, "generation": step, "loss": loss, "ce": float(ce.detach())})
            if best is None or loss < best[0]:
                best = (loss, W.detach().clone())
    assert best is not None
    rows = best[1].cpu().double()
    return {m: rows[0 if tied else i].tolist() for i, m in enumerate(modules)}, trace


def per_module_factors(
    experts: Experts, weights: dict[str, list[float]], mix: str
) -> dict[str, LoraFactors]:
    """One composed LoRA per module: that module's experts combined with its row."""
    out = {}
    for m, row in weights.items():
        present = [(w, fs[m]) for w, (_, fs) in zip(row, experts) if m in fs]
        out[m] = combine([f for _, f in present], [w for w, _ in present], mix)
    return out


def cat_compose(
    model: nn.Module,
    tokenizer: Any,
    experts: Experts,
    shots: Any,
    config: ComposeConfig,
    *,
    tied: bool = False,
) -> dict[str, Any]:
    """Learn CAT's weights on ``shots`` (examples); the model is restored after."""
    start = time.perf_counter()
    if config.mix == "params":
        check_same_ranks(experts)
    max_length = config.max_length or model_context(model)
    batch = encode_shots(tokenizer, shots, max_length=max_length, eos=config.eos, chat=config.chat)
    was_training = model.training
    model.eval()
    try:
        with PopulationScorer.from_config(model, experts, batch, config) as scorer:
            weights, trace = cat_search(model, scorer, config, tied=tied)
    finally:
        model.train(was_training)
    best = min(t["loss"] for t in trace)
    return {
        "weights": weights,
        "factors": per_module_factors(experts, weights, config.mix),
        "loss": best,
        "trace": trace,
        "seconds": time.perf_counter() - start,
    }


def cat(ctx: FewShotContext) -> Built:
    """``fewshot``'s ``cat`` method: learn per-module weights on the shots, attach the result."""
    config = dataclasses.replace(ctx.compose, seed=ctx.seed, optimizer="adam")
    res = cat_compose(ctx.base.model, ctx.base.tokenizer, ctx.experts, ctx.shots, config)
    handle = attach(ctx.base.model, [("cat", res["factors"])], weights=[1.0])
    names = [n for n, _ in ctx.experts]
    mean = torch.tensor(list(res["weights"].values())).mean(0).tolist()
    info = {
        "mean_weights": dict(zip(names, mean)),  # over modules; the full matrix is large
        "loss": res["loss"],
        "seconds": res["seconds"],
    }
    return Built(ctx.base.model, ctx.task, handle.detach, info)


CAT = FewShotMethod(
    "cat", "CAT / LoRA Soups: Adam on one weight per expert per module on the shots", cat
)
