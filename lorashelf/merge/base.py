"""The pieces every merge method shares: the ``MERGES`` registry, input checks, helpers.

A merge method is one function ``fn(experts, config) -> Merged`` plus a frozen config
dataclass, wrapped in a :class:`MergeMethod` and listed by name in
:mod:`lorashelf.merge.registry`; adding one costs a module and a registry line
(mergekit's ``merge_methods`` layout), and the contract tests cover it from there. Experts arrive as
``dict[module_path, LoraFactors]`` (``A [r, d_in]``, ``B [d_out, r]``, ``scale``), so
each module's weight delta is ``scale * B @ A``. Checks here turn mismatched experts
into :class:`LorashelfError` messages that name the offending modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors

Expert = dict[str, LoraFactors]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as its registry entry lists it: ``fn(experts, config, progress)
    -> Merged`` and the frozen options dataclass it takes (its fields are the method's
    options: CLI flags and ``--set`` keys come from them)."""

    name: str
    config_cls: type
    fn: Callable[..., Any]

    @property
    def summary(self) -> str:
        """The first line of ``fn``'s docstring: what ``merge ls`` prints."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


def _listed(names: Sequence[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_experts(experts: Sequence[Expert]) -> list[str]:
    """Validate that the experts can be merged; return the sorted module paths."""
    if not experts:
        raise LorashelfError("merge needs at least one expert; got an empty list")
    ref = experts[0]
    if not ref:
        raise LorashelfError("expert 0 has no LoRA modules; is it a LoRA adapter?")
    for i, ex in enumerate(experts):
        missing = sorted(set(ref) - set(ex))
        extra = sorted(set(ex) - set(ref))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {_listed(missing)}")
            if extra:
                parts.append(f"adds {_listed(extra)}")
            raise LorashelfError(
                f"expert {i} targets different modules than expert 0 ({'; '.join(parts)}); "
                "merge experts trained with the same target modules"
            )
    names = sorted(ref)
    for name in names:
        _check_module(name, [ex[name] for ex in experts])
    return names


def _check_module(name: str, factors: Sequence[LoraFactors]) -> None:
    for i, f in enumerate(factors):
        if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1]:
            raise LorashelfError(
                f"module {name} of expert {i}: A {tuple(f.A.shape)} and B {tuple(f.B.shape)} "
                "are not LoRA factors (need A [r, d_in], B [d_out, r]); re-export the adapter"
            )
    shape0 = (factors[0].B.shape[0], factors[0].A.shape[1])
    for i, f in enumerate(factors):
        shape = (f.B.shape[0], f.A.shape[1])
        if shape != shape0:
            raise LorashelfError(
                f"module {name}: expert 0 has [d_out, d_in] = {list(shape0)} but expert {i} "
                f"has {list(shape)}; merge only adapters trained on the same base model"
            )


def require_same_rank(experts: Sequence[Expert], names: Sequence[str], method: str) -> None:
    """Parameter-space merges average A and B entry by entry, so ranks must agree."""
    for name in names:
        ranks = [int(ex[name].A.shape[0]) for ex in experts]
        if len(set(ranks)) > 1:
            raise LorashelfError(
                f"{method} averages LoRA A/B entries, but module {name} has ranks {ranks} "
                "across experts; use method 'uniform-delta' or ties with space='delta'"
            )


def stacked(factors: Sequence[LoraFactors], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 stacks ``A [E, r, d_in]``, ``B [E, d_out, r]`` and scales ``[E]``."""
    A = torch.stack([f.A.to(device=device, dtype=torch.float32) for f in factors])
    B = torch.stack([f.B.to(device=device, dtype=torch.float32) for f in factors])
    s = torch.tensor([float(f.scale) for f in factors], device=device)
    return A, B, s


def shared_scale(A: Tensor, B: Tensor, s: Tensor) -> tuple[Tensor, Tensor, float]:
    """Keep the experts' common scale; if scales differ, fold each into its B (scale 1).

    Parameter-space merges then average what each expert actually applies.
    """
    if bool((s == s[0]).all()):
        return A, B, float(s[0])
    return A, B * s.view(-1, 1, 1), 1.0


def device_of(experts: Sequence[Expert], names: Sequence[str]) -> torch.device:
    """Merges compute on the device the first expert's factors live on."""
    return experts[0][names[0]].A.device
