"""Uniform merges: the parameter average of LoRA factors, and the exact average delta.

``uniform`` is the mu baseline of Ostapenko et al. 2024 (arXiv 2405.11157):
A_mu = mean_e A_e and B_mu = mean_e B_e, a rank-r LoRA. Its delta B_mu A_mu is *not*
the mean of the experts' deltas: it adds cross terms B_i A_j. ``uniform-delta`` is that
exact mean, (1/E) sum_e scale_e B_e A_e, kept factored as one concatenated-rank LoRA,
A_cat = [A_1; ...; A_E] and B_cat = [scale_1 B_1, ..., scale_E B_E] / E (rank E*r), so
no dense matrix is ever built and nothing is approximated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorashelf.lora.combine import combine
from lorashelf.merge.base import (
    Expert,
    MergeMethod,
    check_experts,
    device_of,
    require_same_rank,
)
from lorashelf.merge.merged import Merged


@dataclass(frozen=True)
class UniformConfig:
    """No options: every expert weighs 1/E."""


@dataclass(frozen=True)
class UniformDeltaConfig:
    """No options: every expert's delta weighs 1/E."""


def uniform(experts: Sequence[Expert], config: UniformConfig, progress: bool = False) -> Merged:
    """mean of A and mean of B separately (the paper's mu baseline); rank r"""
    names = check_experts(experts)
    require_same_rank(experts, names, "uniform")
    device = device_of(experts, names)
    out = {name: combine([ex[name] for ex in experts], device=device) for name in names}
    return Merged("uniform", config, len(experts), out)


def uniform_delta(
    experts: Sequence[Expert], config: UniformDeltaConfig, progress: bool = False
) -> Merged:
    """exact mean of the experts' deltas, as one concatenated LoRA of rank E*r"""
    names = check_experts(experts)
    device = device_of(experts, names)
    out = {n: combine([ex[n] for ex in experts], mix="output", device=device) for n in names}
    return Merged("uniform-delta", config, len(experts), out)


UNIFORM = MergeMethod("uniform", UniformConfig, uniform)


UNIFORM_DELTA = MergeMethod("uniform-delta", UniformDeltaConfig, uniform_delta)
