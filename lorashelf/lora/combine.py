"""The one weighted combination of LoRA factors, module by module.

Two ways to weigh experts ``e`` with weights ``w_e`` at one module, the two
"mixes" of the mixture layer and of mttl:

- ``params``: ``A = sum_e w_e A_e``, ``B = sum_e w_e B_e``, one LoRA of the experts'
  common rank. Its update ``B A`` is *not* the weighted sum of the updates (it has
  cross terms ``w_i w_j B_i A_j``). With equal weights this is the uniform merge of
  Ostapenko et al. 2024 (mu, arXiv 2405.11157); with searched weights it is LoraHub's
  composition (Huang et al. 2023, arXiv 2307.13269). The experts' common scale is kept
  (so a saved result is exactly the reference's merged state dict); differing scales
  are folded into ``B`` first.
- ``output``: ``sum_e w_e s_e B_e A_e`` exactly, kept factored by concatenation,
  ``A = [A_1; ...; A_E]``, ``B = [w_1 s_1 B_1, ..., w_E s_E B_E]`` (rank = sum of ranks).

``weights=None`` means equal weights, computed as a mean (so the uniform merge is the
exact average of the stored factors). Everything is computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors

MIXES = ("output", "params")


def combine(
    factors: Sequence[LoraFactors],
    weights: Sequence[float] | torch.Tensor | None = None,
    mix: str = "params",
    *,
    device: torch.device | str | None = None,
) -> LoraFactors:
    """The weighted combination of one module's ``factors`` (float32, on ``device``:
    default the first factor's device)."""
    if mix not in MIXES:
        raise LorashelfError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    if not factors:
        raise LorashelfError("nothing to combine: no factors given")
    n = len(factors)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64).tolist()
    if w is not None and len(w) != n:
        raise LorashelfError(f"got {len(w)} weights for {n} experts")
    device = device if device is not None else factors[0].A.device
    As = [f.A.to(device=device, dtype=torch.float32) for f in factors]
    Bs = [f.B.to(device=device, dtype=torch.float32) for f in factors]
    if mix == "output":
        ws = (
            [f.scale / n for f in factors]
            if w is None
            else [wi * f.scale for wi, f in zip(w, factors)]
        )
        return LoraFactors(
            A=torch.cat(As), B=torch.cat([b * s for b, s in zip(Bs, ws)], 1), scale=1.0
        )
    ranks = sorted({a.shape[0] for a in As})
    if len(ranks) > 1:
        raise LorashelfError(
            f"mix='params' adds the experts' A and B matrices entry by entry, but they have "
            f"ranks {ranks}; combine experts of one rank or use mix='output', which sums "
            "their updates exactly"
        )
    scales = {float(f.scale) for f in factors}
    common = scales.pop() if len(scales) == 1 else None
    if common is None:
        Bs = [b * f.scale for b, f in zip(Bs, factors)]
    if w is None:
        A, B = torch.stack(As).mean(0), torch.stack(Bs).mean(0)
    else:
        A = sum(wi * a for wi, a in zip(w, As))
        B = sum(wi * b for wi, b in zip(w, Bs))
    return LoraFactors(A=A, B=B, scale=common if common is not None else 1.0)
