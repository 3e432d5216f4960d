"""GenKnowSub (general knowledge subtraction; Bagherifard et al., ACL 2025, arXiv
2505.10939): subtract the mean of "general knowledge" adapters from every task expert
before routing, so what all experts share (language, format) stops deciding the routes.

General adapters are ordinary experts of the library trained on plain text (e.g.
``lorashelf train LIB --tasks jsonl:wiki.jsonl``), named by ``gks_experts``; they are
removed from the routed set. Two variants:

- ``"peft"``: PEFT's ``ArrowConfig(use_gks=True)``: ``A_i - mean_g A_g`` and
  ``B_i - mean_g B_g`` separately, each task expert keeping its own scale. Its update
  ``s_i (B_i - B̄)(A_i - Ā)`` is *not* ``s_i B_i A_i`` minus the general mean (it has
  cross terms); kept for parity, cross-checked against ``create_arrow_model(...,
  use_gks=True)`` in tests/route/test_genknowsub.py. Needs one rank for all.
- ``"delta"``: the exact subtraction in update space, ``s_i B_i A_i - mean_g s_g B_g A_g``,
  kept low-rank by concatenating the factors with weights ``1, -1/G, ...``
  (lorashelf.lora.combine, ``mix="output"``: rank ``r_i + sum_g r_g``); Arrow's
  prototypes of the result come from the thin-QR + small-core SVD as for any expert.

The subtracted experts are what the mixture computes as well as what the prototypes
are taken from, as in PEFT (which edits the task adapters in place). Their derived
tensors are cached under a checksum that also names the variant and the general
experts, so a change of either recomputes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library.factors import LoraFactors
from lorashelf.lora.combine import combine
from lorashelf.lora.stack import Experts

VARIANTS = ("none", "peft", "delta")


def _subtract(
    fs: dict[str, LoraFactors], general: list[dict], variant: str
) -> dict[str, LoraFactors]:
    """Each module of ``fs`` minus the mean of the general experts adapting it."""
    out = {}
    for m, f in fs.items():
        gs = [g[m] for g in general if m in g]
        minus = _minus_mean_factors if variant == "peft" else _minus_mean_delta
        out[m] = minus(m, f, gs) if gs else f
    return out


def _minus_mean_factors(m: str, f: LoraFactors, gs: list[LoraFactors]) -> LoraFactors:
    """PEFT's variant: ``A - mean A_g``, ``B - mean B_g`` (entry by entry)."""
    if {g.rank for g in gs} != {f.rank}:
        raise LorashelfError(
            f"gks='peft' subtracts A and B entry by entry, but at {m} the task expert has "
            f"rank {f.rank} and the general experts {sorted({g.rank for g in gs})}; use "
            "gks='delta', which subtracts the updates exactly"
        )
    A = f.A.float() - torch.stack([g.A.float() for g in gs]).mean(0)
    B = f.B.float() - torch.stack([g.B.float() for g in gs]).mean(0)
    return LoraFactors(A.to(f.A.dtype), B.to(f.B.dtype), f.scale)


def _minus_mean_delta(m: str, f: LoraFactors, gs: list[LoraFactors]) -> LoraFactors:
    """The exact update difference ``s B A - mean_g s_g B_g A_g``, kept low-rank."""
    c = combine([f, *gs], [1.0] + [-1.0 / len(gs)] * len(gs), "output")
    return LoraFactors(c.A.to(f.A.dtype), c.B.to(f.B.dtype), c.scale)


def subtract_general(
    experts: Experts,
    checksums: Sequence[str] | None,
    general: Sequence[str],
    variant: str,
) -> tuple[Experts, list[str] | None]:
    """The task experts (those not named in ``general``) with the general experts' mean
    subtracted, and checksums for their derived tensors (empty where the expert had none)."""
    if variant not in VARIANTS:
        raise LorashelfError(f"unknown gks {variant!r}; use one of {', '.join(VARIANTS)}")
    names = [n for n, _ in experts]
    if variant == "none":
        return experts, list(checksums) if checksums is not None else None
    if not general:
        raise LorashelfError(
            f"gks={variant!r} needs the general-knowledge experts: pass gks_experts=NAME,... "
            "(adapters trained on plain text, e.g. `lorashelf train LIB --tasks jsonl:wiki.jsonl`)"
        )
    for g in general:
        if g not in names:
            raise LorashelfError(
                f"general expert {g!r} is not among the experts{did_you_mean(g, names)}"
            )
    gen = [fs for n, fs in experts if n in general]
    tasks = [(i, n, fs) for i, (n, fs) in enumerate(experts) if n not in general]
    if not tasks:
        raise LorashelfError("every expert is a general-knowledge expert; nothing is left to route")
    out = [(n, _subtract(fs, gen, variant)) for _, n, fs in tasks]
    if checksums is None:
        return out, None
    tag = hashlib.sha256(
        "\0".join([variant] + sorted(checksums[names.index(g)] for g in general)).encode()
    ).hexdigest()[:16]
    sums = [f"{checksums[i]}~gks-{tag}" if checksums[i] else "" for i, _, _ in tasks]
    return out, sums
