"""Adapter parameter vectors: what MBC compares (Ostapenko et al. 2024, arXiv 2405.11157).

Model-Based Clustering represents each LoRA expert by its own parameters: the A and B
matrices of every adapted module, flattened and concatenated in one fixed module
order, optionally sparsified by zeroing the entries below a per-expert magnitude
quantile (the reference keeps the largest entries only, so a few large, task-specific
weights dominate the comparison). Experts are read one at a time through a
``FactorLoader`` (a function name -> {module: factors with ``.A`` and ``.B``}), so a
library never has to sit in memory whole.

LoRA's A starts random: two experts trained from different initialisation seeds differ
in A even on the same task, and their similarity would measure the seed rather than the
task. :func:`check_init_seeds` reads the ``init_seed`` every trainer card records.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors

FactorLoader = Callable[[str], Mapping[str, LoraFactors]]
# (module path, A shape, B shape) for every adapted module, in flattening order.
Layout = tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]


def layout_of(factors: Mapping[str, LoraFactors]) -> Layout:
    """The flattening order and shapes of one expert; modules sorted by path."""
    return tuple((m, tuple(factors[m].A.shape), tuple(factors[m].B.shape)) for m in sorted(factors))


def layout_size(layout: Layout) -> int:
    """Length of the flattened parameter vector of an expert with this layout."""
    return sum(_numel(a) + _numel(b) for _, a, b in layout)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_layout(name: str, factors: Mapping[str, LoraFactors], ref: Layout, ref_name: str) -> None:
    """Raise if expert ``name`` cannot be compared with ``ref_name`` parameter by parameter."""
    got = layout_of(factors)
    if got == ref:
        return
    fix = (
        "MBC compares flattened LoRA parameters, so every expert needs the same base model, "
        "target modules and rank; cluster a subset of one shape (retrain or remove "
        f"{name!r})"
    )
    ref_mods, got_mods = [m for m, _, _ in ref], [m for m, _, _ in got]
    if ref_mods != got_mods:
        missing = sorted(set(ref_mods) - set(got_mods))[:2]
        extra = sorted(set(got_mods) - set(ref_mods))[:2]
        raise LorashelfError(
            f"expert {name!r} adapts different modules than {ref_name!r} "
            f"(missing {missing or '-'}, extra {extra or '-'}); {fix}"
        )
    for (m, a_ref, b_ref), (_, a, b) in zip(ref, got):
        if (a, b) != (a_ref, b_ref):
            raise LorashelfError(
                f"expert {name!r} has {m} with A {list(a)}, B {list(b)} but {ref_name!r} has "
                f"A {list(a_ref)}, B {list(b_ref)}; {fix}"
            )


def flatten(factors: Mapping[str, LoraFactors], layout: Layout, out: torch.Tensor) -> torch.Tensor:
    """Write A then B of each module, in ``layout`` order, into the 1-D tensor ``out``."""
    pos = 0
    for m, _, _ in layout:
        for t in (factors[m].A, factors[m].B):
            n = t.numel()
            out[pos : pos + n].copy_(t.reshape(-1))
            pos += n
    return out


def sparsify_(vec: torch.Tensor, quantile: float) -> torch.Tensor:
    """Zero (in place) the ``floor(quantile * len)`` smallest-magnitude entries of ``vec``.

    Entries tied with the threshold are zeroed too, as in the reference's ``|x| <= thr``.
    A selection, not ``torch.quantile`` (which refuses inputs above 16M entries); on the
    CPU numpy's introselect is about twice as fast as ``kthvalue``.
    """
    k = int(quantile * vec.numel())
    if k <= 0:
        return vec
    mag = vec.abs()
    if mag.device.type == "cpu":
        m = mag if mag.dtype in (torch.float32, torch.float64) else mag.float()
        thr = torch.tensor(np.partition(m.numpy(), k - 1)[k - 1])
    else:
        thr = mag.kthvalue(k).values
    return vec.masked_fill_(mag <= thr, 0)


def load_vectors(
    names: Sequence[str],
    load: FactorLoader,
    layout: Layout,
    ref_name: str,
    *,
    sparsity: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flattened (and sparsified) float32 vectors of ``names`` as rows of one block."""
    out = torch.empty(len(names), layout_size(layout), dtype=torch.float32, device=device)
    for i, name in enumerate(names):
        factors = load(name)
        check_layout(name, factors, layout, ref_name)
        flatten(factors, layout, out[i])
        sparsify_(out[i], sparsity)
    return out


def check_init_seeds(cards: Mapping[str, Mapping[str, Any]], *, allow_mixed: bool = False) -> None:
    """Refuse (or, with ``allow_mixed``, warn) when experts' LoRA init seeds differ.

    Experts without a recorded ``init_seed`` (e.g. imported adapters) only warn: their
    seed is unknown, not known to differ.
    """
    seeds: dict[Any, list[str]] = {}
    unknown = []
    for name, card in cards.items():
        seed = card.get("init_seed")
        if seed is None:
            unknown.append(name)
        else:
            seeds.setdefault(seed, []).append(name)
    if len(seeds) > 1:
        detail = "; ".join(f"init_seed={s}: {', '.join(v[:3])}" for s, v in seeds.items())
        msg = (
            f"experts were trained from {len(seeds)} different LoRA init seeds ({detail}); "
            "LoRA's A starts random, so parameter similarity would group experts by seed, "
            "not by task"
        )
        if not allow_mixed:
            raise LorashelfError(
                f"{msg}. Retrain with one --init-seed, cluster experts of one seed, or pass "
                "--allow-mixed-init to cluster anyway"
            )
        warnings.warn(msg, stacklevel=2)
    if unknown:
        warnings.warn(
            f"{len(unknown)} expert(s) record no init_seed (e.g. {unknown[0]!r}); if they "
            "were initialised differently, parameter similarity reflects the seed",
            stacklevel=2,
        )
