"""The gradient baseline of LoraHub: learn the expert weights with Adam instead of CMA-ES.

LoraHub (Huang et al. 2023, arXiv 2307.13269) searches its weights without gradients;
the question a reader asks next is what plain gradient descent on the same few
weights and the same objective gets. lorashelf's mixture layer is differentiable in
its weights, so each step is one forward and one backward pass over the shots with the
model frozen. Weights start at the uniform merge ``1/E`` (at all-zero weights the
``params`` composition ``(sum w B)(sum w A)`` has zero gradient), are clipped to the
bounds after each step, and ``budget`` counts steps (one forward + one backward each,
about three forward passes of compute). The best iterate is returned, as the
gradient-free searches return their best candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.scoring import PopulationScorer


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No gradients into the model's own parameters inside the block (restored after)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def adam_steps(
    w: torch.Tensor,
    cross_entropy: Callable[[], torch.Tensor],
    config: ComposeConfig,
    *,
    desc: str = "adam",
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``budget`` Adam steps on ``ce + l1 * mean|w|``, ``w`` clipped to the bounds after
    each; yields ``(step, objective, ce)`` for every iterate, the final one included
    (the last pass only scores it). The caller keeps the best (the model frozen)."""
    lo, hi = config.bounds
    opt = torch.optim.Adam([w], lr=config.lr)
    best = float("inf")
    with tqdm(total=config.budget, desc=desc, disable=not progress) as bar:
        for step in range(config.budget + 1):
            ce = cross_entropy()
            objective = ce + config.l1 * w.abs().mean()
            yield step, objective, ce
            best = min(best, float(objective.detach()))
            if step == config.budget:
                break
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            with torch.no_grad():
                w.clamp_(lo, hi)
            bar.update()
            bar.set_postfix(loss=f"{best:.4f}")


def adam_search(
    model: nn.Module, scorer: PopulationScorer, config: ComposeConfig, progress: bool = False
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``budget`` Adam steps on ``ce + l1 * mean|w|``; returns the best iterate and the trace."""
    e = scorer.n_experts
    device = next(model.parameters()).device
    w = torch.full((e,), 1.0 / e, device=device, requires_grad=True)
    trace: list[dict[str, Any]] = []
    with frozen(model):
        for step, objective, ce in adam_steps(
            w, lambda: scorer.forward(w[None])[0], config, progress=progress
        ):
            x = w.detach().cpu().double().numpy()
            trace.append(_entry(step, float(objective.detach()), float(ce.detach()), x))
    best = min(trace, key=lambda t: t["loss"])
    return np.asarray(best["weights"], dtype=np.float64), trace


def _entry(step: int, loss: float, ce: float, x: np.ndarray) -> dict[str, Any]:
    return {"eval": step, "generation": step, "loss": loss, "ce": ce, "weights": x.tolist()}
