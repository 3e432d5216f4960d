"""Arrow routing (Ostapenko et al. 2024, arXiv 2405.11157, section 4): zero-shot, per
token and per layer, from the experts' parameters alone.

At every adapted module each expert has a prototype, the top right singular vector
of its update ``B A`` (exact, from lorashelf.route.prototypes). A token ``x`` is
scored against every expert by ``|<x, prototype_e>|`` (the sign of a singular vector
is arbitrary), the ``top_k`` best are kept and a softmax over their scores divided by
``temperature`` gives the mixture weights; the other experts get weight zero. PEFT's
``create_arrow_model`` implements the same rule with power-iteration prototypes and
computes every expert for every token; tests/route/test_peft_arrow.py compares both.

``gks`` ("peft" or "delta") first subtracts the mean of the general-knowledge experts
named in ``gks_experts`` from every other expert and routes over those only
(GenKnowSub, lorashelf.route.genknowsub).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorashelf.errors import LorashelfError
from lorashelf.lora.mixture import MIXES
from lorashelf.lora.stack import Experts
from lorashelf.route.genknowsub import VARIANTS as GKS_VARIANTS
from lorashelf.route.genknowsub import subtract_general
from lorashelf.route.prototypes import CACHE_FILE, arrow_prototypes
from lorashelf.route.router import RouterContext, RouterMethod


@dataclass(frozen=True)
class ArrowConfig:
    """Arrow's options: experts per token, softmax temperature, output or parameter mixing."""

    top_k: int = 4
    temperature: float = 1.0
    mix: str = "output"
    gks: str = "none"  # GenKnowSub: "none", "peft" (A and B apart) or "delta" (exact)
    gks_experts: tuple[str, ...] = ()  # the general-knowledge experts, not routed

    def __post_init__(self) -> None:
        if isinstance(self.gks_experts, str):  # --set gks_experts=wiki,books
            object.__setattr__(self, "gks_experts", tuple(self.gks_experts.split(",")))
        object.__setattr__(self, "gks_experts", tuple(self.gks_experts))
        if self.gks not in GKS_VARIANTS:
            raise LorashelfError(f"unknown gks {self.gks!r}; use one of {', '.join(GKS_VARIANTS)}")
        if self.top_k < 1:
            raise LorashelfError(f"Arrow top_k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise LorashelfError(f"Arrow temperature must be > 0, got {self.temperature}")
        if self.mix not in MIXES:
            raise LorashelfError(f"unknown mix {self.mix!r}; use one of {', '.join(MIXES)}")


class ArrowRouter(nn.Module):
    """Top-k softmax over ``|x . prototype_e| / temperature`` for one module."""

    def __init__(self, prototypes: torch.Tensor, top_k: int, temperature: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes, persistent=False)  # [E_m, d_in]
        self.top_k: int | None = min(top_k, prototypes.shape[0])
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = nn.functional.linear(x, self.prototypes.to(x.dtype)).abs()  # [..., E_m]
        vals, idx = sim.topk(self.top_k, dim=-1)
        probs = (vals.float() / self.temperature).softmax(-1).to(x.dtype)
        return torch.zeros_like(sim).scatter(-1, idx, probs)


def build_arrow_routers(config: ArrowConfig, ctx: RouterContext) -> dict[str, ArrowRouter]:
    """One :class:`ArrowRouter` per adapted module; prototypes cached in ``ctx.cache_dir``."""
    n = len(ctx.experts)
    if n == 0:
        raise LorashelfError("Arrow needs at least one expert; the expert list is empty")
    if config.gks != "none" and set(config.gks_experts) & set(ctx.expert_names):
        raise LorashelfError(
            "GenKnowSub rewrites the experts before routing; build Arrow with "
            "build_routed_model (or arrow_experts first), not with its router builder alone"
        )
    if config.top_k > n:
        warnings.warn(
            f"Arrow top_k={config.top_k} exceeds the {n} experts; using top_k={n}",
            stacklevel=3,
        )
    use_cache = ctx.cache_dir is not None and ctx.checksums is not None
    protos = arrow_prototypes(
        ctx.experts,
        checksums=ctx.checksums,
        cache_path=ctx.cache_dir / CACHE_FILE if use_cache else None,
        device=ctx.device,
    )
    return {m: ArrowRouter(p, config.top_k, config.temperature) for m, p in protos.items()}


def arrow_experts(
    config: ArrowConfig, experts: Experts, checksums: Sequence[str] | None
) -> tuple[Experts, list[str] | None]:
    """The experts Arrow routes over: all of them, or with ``gks`` the task experts minus
    the general experts' mean."""
    return subtract_general(experts, checksums, config.gks_experts, config.gks)


ARROW = RouterMethod(
    ArrowConfig,
    build_arrow_routers,
    "Arrow: top-k over |x . v_e|, v_e the top right singular vector of B_e A_e",
    arrow_experts,
)


def preselect_scores(
    model: nn.Module, experts: Experts, shots: Any, config: Any = None
) -> list[float]:
    """Mean Arrow routing weight of each expert over ``shots``' tokens (top-4 routing):
    LoraHub's ``--preselect-by arrow`` (``shots`` has ``input_ids``/``attention_mask``)."""
    from lorashelf.route.routed import build_routed_model

    arrow = ArrowConfig(top_k=min(4, len(experts)))
    device = next(model.parameters()).device
    with build_routed_model(model, experts, "arrow", arrow) as routed, torch.no_grad():
        with routed.record() as stats:
            routed.get_base_model()(
                input_ids=shots.input_ids.to(device),
                attention_mask=shots.attention_mask.to(device),
                use_cache=False,
            )
    return stats.overall()
