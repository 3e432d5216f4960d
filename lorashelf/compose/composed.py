"""The composed expert as LoRA factors: what a weighting of the experts amounts to.

``mix="params"`` is LoraHub's composition (Huang et al. 2023, arXiv 2307.13269; the
reference's ``get_final_weights``): ``A = sum_e w_e A_e`` and ``B = sum_e w_e B_e``,
one LoRA of the experts' rank whose update ``B A`` is *not* the weighted sum of the
experts' updates (it has cross terms ``w_i w_j B_i A_j``). ``mix="output"`` is that
weighted sum exactly, kept factored by concatenation: ``A = [A_1; ...; A_E]``,
``B = [w_1 s_1 B_1, ..., w_E s_E B_E]`` (rank = sum of ranks). Either can be cut to a
smaller rank with :func:`lorashelf.lora.peft.truncate_all`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.lora.combine import combine
from lorashelf.lora.stack import Experts


def check_same_ranks(experts: Experts) -> None:
    """``mix="params"`` adds A and B entry by entry, so each module needs one rank
    (checked before a search starts, naming the experts)."""
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
    """``{module path: LoraFactors}`` of the experts composed with ``weights`` (fp32),
    by the core's one weighted combination (:func:`lorashelf.lora.combine`)."""
    w = torch.as_tensor(weights, dtype=torch.float64).tolist()
    if len(w) != len(experts):
        raise LorashelfError(f"got {len(w)} weights for {len(experts)} experts")
    if mix == "params":
        check_same_ranks(experts)
    out = {}
    for module in sorted({m for _, fs in experts for m in fs}):
        present = [(wi, fs[module]) for wi, (_, fs) in zip(w, experts) if module in fs]
        try:
            out[module] = combine([f for _, f in present], [wi for wi, _ in present], mix)
        except LorashelfError as e:
            raise LorashelfError(f"at {module}: {e}") from None
    return out


def is_zero(factors: dict[str, LoraFactors]) -> bool:
    """True when every module's update is exactly zero (e.g. all weights 0)."""
    return all(not bool(f.B.any()) or not bool(f.A.any()) for f in factors.values())
