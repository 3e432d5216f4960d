"""PHATGOOSE routing (Muqeeth et al. 2024, arXiv 2402.05859): zero-shot, per token and
per module, from gates trained after each expert.

Post-hoc gate training (section 3; lorashelf.route.gates) gives every expert ``e`` a
gate vector ``g_e`` per adapted module: with the expert and the base frozen, the
module computed ``base(x) + sigmoid(<g_e, x>) * scale * B_e A_e x`` and ``g_e`` learnt
which tokens the expert should see. At inference (section 3, Figure 2) a token ``x``
is scored against every expert present at the module: both the gate vectors and the
token are standardised (mean-centred and divided by their standard deviation, i.e. a
LayerNorm without affine weights, so each has norm ``sqrt(d)``), the score is their
dot product divided by ``sqrt(d)``, the ``top_k`` best experts are kept (the paper
uses k = 2) and a softmax over the kept scores gives their weights; the others get
zero. The normalisation, the ``1/sqrt(d)`` scale and the renormalised top-k follow
the authors' code (r-three/phatgoose: LayerNorm on input and expert embeddings,
``scaling_scores``, ``topk_value=2`` with ``normalize_topk``), as does mttl's
re-implementation used by Ostapenko et al. 2024 (arXiv 2405.11157).

Gates come from ``ctx.extras["phatgoose_gates"]`` (one ``{module: [d_in]}`` per
expert) or from ``PhatgooseConfig.gates_dir`` keyed by ``ctx.checksums`` (the
adapters' sha256; a library's directory is ``gate_store.gates_dir(LIBRARY)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorashelf.errors import LorashelfError
from lorashelf.lora.mixture import MIXES
from lorashelf.route.gate_store import gates_dir, load_expert_gates, train_command
from lorashelf.route.router import RouterContext, RouterMethod

EPS = 1e-5  # LayerNorm's default, as in the reference implementation
EXTRAS_KEY = "phatgoose_gates"
Gates = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PhatgooseConfig:
    """PHATGOOSE's options: experts per token, output or parameter mixing, where gates are."""

    top_k: int = 2
    mix: str = "output"
    gates_dir: str | None = None

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise LorashelfError(f"PHATGOOSE top_k must be >= 1, got {self.top_k}")
        if self.mix not in MIXES:
            raise LorashelfError(f"unknown mix {self.mix!r}; use one of {', '.join(MIXES)}")


def standardize(v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(v - mean) / sqrt(var + eps)`` over the last dim, in float32 (LayerNorm, no affine)."""
    v = v.float()
    return nn.functional.layer_norm(v, v.shape[-1:], eps=eps)


class PhatgooseRouter(nn.Module):
    """Top-k softmax over ``<std(x), std(g_e)> / sqrt(d)`` for one module."""

    def __init__(self, gates: torch.Tensor, top_k: int) -> None:
        super().__init__()
        if gates.dim() != 2:
            raise ValueError(f"gates must be [E_m, d_in], got {tuple(gates.shape)}")
        self.register_buffer("gates", standardize(gates), persistent=False)  # [E_m, d_in]
        self.top_k: int | None = min(top_k, gates.shape[0])
        self.scale = 1.0 / math.sqrt(gates.shape[1])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinity of each token with each expert, ``[..., E_m]`` (float32)."""
        return nn.functional.linear(standardize(x), self.gates) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.scores(x)
        vals, idx = scores.topk(self.top_k, dim=-1)
        probs = vals.softmax(-1)
        return torch.zeros_like(scores).scatter(-1, idx, probs).to(x.dtype)


def build_phatgoose_routers(
    config: PhatgooseConfig, ctx: RouterContext
) -> dict[str, PhatgooseRouter]:
    """One :class:`PhatgooseRouter` per adapted module, from each expert's stored gates."""
    names = ctx.expert_names
    if not names:
        raise LorashelfError("PHATGOOSE needs at least one expert; the expert list is empty")
    gates = _expert_gates(config, ctx)
    _check_coverage(ctx, gates, config.gates_dir)
    modules = sorted({m for _, factors in ctx.experts for m in factors})
    routers = {}
    for m in modules:
        members = [i for i, (_, factors) in enumerate(ctx.experts) if m in factors]
        stacked = torch.stack([gates[i][m].float() for i in members]).to(ctx.device)
        routers[m] = PhatgooseRouter(stacked, config.top_k)
    return routers


def _expert_gates(config: PhatgooseConfig, ctx: RouterContext) -> Sequence[Gates]:
    given = ctx.extras.get(EXTRAS_KEY)
    if given is not None:
        if len(given) != len(ctx.experts):
            raise LorashelfError(
                f"got PHATGOOSE gates for {len(given)} experts but routing {len(ctx.experts)}"
            )
        return list(given)
    directory = config.gates_dir or (gates_dir(ctx.library_dir) if ctx.library_dir else None)
    if directory is None:
        raise LorashelfError(
            "PHATGOOSE routes with each expert's trained gates: pass "
            "PhatgooseConfig(gates_dir=...) (for a library: "
            "lorashelf.route.gate_store.gates_dir(LIBRARY), filled by `lorashelf gates train "
            "LIBRARY`)"
        )
    if ctx.checksums is None:
        raise LorashelfError(
            "PHATGOOSE finds gates by adapter checksum: pass checksums= (the sha256 of each "
            "expert's adapter_model.safetensors, as its card records it)"
        )
    return load_expert_gates(str(directory), ctx.expert_names, list(ctx.checksums))


def _check_coverage(ctx: RouterContext, gates: Sequence[Gates], gates_dir: str | None) -> None:
    """Every module an expert adapts needs that expert's gate, of the module's input size."""
    for (name, factors), g in zip(ctx.experts, gates):
        lacking = sorted(set(factors) - set(g))
        bad = [m for m in factors if m in g and tuple(g[m].shape) != (factors[m].A.shape[1],)]
        if lacking or bad:
            what = f"no gate for {lacking[0]}" if lacking else f"a wrong-sized gate for {bad[0]}"
            raise LorashelfError(
                f"PHATGOOSE gates of expert {name!r} have {what}: they belong to another "
                f"adapter; retrain them (`{train_command([name], gates_dir)} --overwrite`)"
            )


PHATGOOSE = RouterMethod(
    PhatgooseConfig, build_phatgoose_routers, "PHATGOOSE: top-k over trained sigmoid gates"
)
