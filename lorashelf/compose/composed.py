"""The composed expert as LoRA factors: what a weighting of the experts amounts to.

``mix="params"`` is LoraHub's composition (Huang et al. 2023, arXiv 2307.13269; the
reference's ``get_final_weights``): ``A = sum_e w_e A_e`` and ``B = sum_e w_e B_e``,
one LoRA of the experts' rank whose update ``B A`` is *not* the weighted sum of the
experts' updates (it has cross terms ``w_i w_j B_i A_j``). ``mix="output"`` is that
weighted sum exactly, kept factored by concatenation: ``A = [A_1; ...; A_E]``,
``B = [w_1 s_1 B_1, ..., w_E s_E B_E]`` (rank = sum of ranks). Either can be cut to a
smaller rank by SVD, the best rank-k approximation in Frobenius norm (Eckart-Young),
computed on the small core after QR of both factors, never on a dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.route.stack import Experts


def check_same_ranks(experts: Experts) -> None:
    """``mix="params"`` adds A and B entry by entry, so each module needs one rank."""
    for module in sorted({m for _, fs in experts for m in fs}):
        ranks = {name: int(fs[module].A.shape[0]) for name, fs in experts if module in fs}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{n}: r={r}" for n, r in list(ranks.items())[:6])
            raise LorashelfError(
                f"mix='params' adds the experts' A and B matrices entry by entry, but they have "
                f"different ranks at {module} ({listed}); compose experts of one rank or use "
                "mix='output' (--mix output), which sums their updates exactly"
            )


def composed_factors(
    experts: Experts, weights: Sequence[float] | torch.Tensor, mix: str = "params"
) -> dict[str, LoraFactors]:
    """``{module path: LoraFactors}`` of the experts composed with ``weights`` (fp32).

    For ``params`` the experts' common scale is kept (so the saved adapter is exactly
    the reference's merged state dict); if scales differ they are folded into ``B``.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).tolist()
    if len(w) != len(experts):
        raise LorashelfError(f"got {len(w)} weights for {len(experts)} experts")
    if mix == "params":
        check_same_ranks(experts)
    out = {}
    for module in sorted({m for _, fs in experts for m in fs}):
        present = [(wi, fs[module]) for wi, (_, fs) in zip(w, experts) if module in fs]
        out[module] = _params(present) if mix == "params" else _output(present)
    return out


def _params(present: list[tuple[float, LoraFactors]]) -> LoraFactors:
    scales = {float(f.scale) for _, f in present}
    common = scales.pop() if len(scales) == 1 else None
    A = sum(wi * f.A.float() for wi, f in present)
    B = sum(wi * f.B.float() * (1.0 if common is not None else f.scale) for wi, f in present)
    return LoraFactors(A=A, B=B, scale=common if common is not None else 1.0)


def _output(present: list[tuple[float, LoraFactors]]) -> LoraFactors:
    A = torch.cat([f.A.float() for _, f in present])
    B = torch.cat([f.B.float() * (wi * f.scale) for wi, f in present], dim=1)
    return LoraFactors(A=A, B=B, scale=1.0)


def is_zero(factors: dict[str, LoraFactors]) -> bool:
    """True when every module's update is exactly zero (e.g. all weights 0)."""
    return all(not bool(f.B.any()) or not bool(f.A.any()) for f in factors.values())


def sq_norm(f: LoraFactors) -> float:
    """``||scale * B A||_F^2`` from the two ``r x r`` Gram matrices."""
    A, B = f.A.double(), f.B.double()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


def truncate(f: LoraFactors, rank: int) -> tuple[LoraFactors, float]:
    """``f`` cut to at most ``rank`` by SVD; returns it and the squared error dropped."""
    if f.rank <= rank:
        return f, 0.0
    qb, rb = torch.linalg.qr(f.B.double())
    qa, ra = torch.linalg.qr(f.A.double().T)
    u, s, vh = torch.linalg.svd(f.scale * (rb @ ra.T))
    root = s[:rank].sqrt()
    A = (root[:, None] * (vh[:rank] @ qa.T)).float()
    B = ((qb @ u[:, :rank]) * root).float()
    return LoraFactors(A=A, B=B, scale=1.0), float((s[rank:] ** 2).sum())


def truncate_all(
    factors: dict[str, LoraFactors], rank: int | None
) -> tuple[dict[str, LoraFactors], float]:
    """Every module cut to ``rank`` (None: unchanged) and the relative Frobenius error
    ``sqrt(sum dropped^2 / sum ||delta||^2)`` over all modules."""
    if rank is None:
        return dict(factors), 0.0
    if rank < 1:
        raise LorashelfError(f"rank must be >= 1 to truncate, got {rank}")
    out, dropped, total = {}, 0.0, 0.0
    for module, f in factors.items():
        total += sq_norm(f)
        out[module], d = truncate(f, rank)
        dropped += d
    return out, (dropped / total) ** 0.5 if total > 0 else 0.0
