"""Stack a library's LoRA factors module by module, ready for one-matmul mixing.

Each expert is ``(name, {module path: LoraFactors})`` (``A [r, d_in]``, ``B [d_out, r]``,
``scale``). For every adapted module we keep only the experts that adapt it
(the others contribute nothing there), fold each expert's scale into its ``B`` and
zero-pad mixed ranks to the largest one: padded rows of ``A`` and columns of ``B``
are zero, so they add nothing to any output. The stacks are the layout of the
mixture layer (lorashelf.lora.mixture): ``A`` flattens to one ``(E*r) x d_in``
matrix and ``B`` to one ``d_out x (E*r)`` matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors

# The one "set of experts" type every method reads: (name, {module path: factors}).
Experts = Sequence[tuple[str, Mapping[str, LoraFactors]]]


@dataclass(frozen=True)
class ExpertStack:
    """The experts adapting one module, stacked (``E_m`` present experts)."""

    module: str
    members: tuple[int, ...]  # index of each stacked expert in the experts list
    ranks: tuple[int, ...]  # true rank of each stacked expert (before padding)
    A: torch.Tensor  # [E_m, r_max, d_in]
    B: torch.Tensor  # [E_m, d_out, r_max], scale folded in

    @property
    def d_in(self) -> int:
        return self.A.shape[-1]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]


def check_experts(experts: Experts) -> list[str]:
    """The expert names; refuses an empty list and duplicate names."""
    if len(experts) == 0:
        raise LorashelfError("no experts given; add adapters to the library or pass at least one")
    names = [name for name, _ in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LorashelfError(f"expert names must be unique; repeated: {', '.join(dupes)}")
    return names


def stack_experts(
    experts: Experts,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, ExpertStack]:
    """Stack the factors of every adapted module (sorted by module path).

    Shapes are checked per module: all experts adapting a module must agree on
    ``d_in`` and ``d_out`` (else the error names the experts of each shape).
    """
    names = check_experts(experts)
    modules = sorted({m for _, factors in experts for m in factors})
    stacks = {}
    for module in modules:
        present = [
            (i, experts[i][1][module]) for i in range(len(experts)) if module in experts[i][1]
        ]
        _check_shapes(module, [(names[i], f) for i, f in present])
        r_max = max(f.A.shape[0] for _, f in present)
        A = torch.stack([_pad_rows(f.A.float(), r_max) for _, f in present])
        B = torch.stack([_pad_rows(f.B.float().T * f.scale, r_max).T for _, f in present])
        dt = dtype or present[0][1].A.dtype
        stacks[module] = ExpertStack(
            module=module,
            members=tuple(i for i, _ in present),
            ranks=tuple(f.A.shape[0] for _, f in present),
            A=A.to(device=device, dtype=dt).contiguous(),
            B=B.to(device=device, dtype=dt).contiguous(),
        )
    return stacks


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _check_shapes(module: str, present: list[tuple[str, LoraFactors]]) -> None:
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, f in present:
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
            raise LorashelfError(
                f"expert {name!r} at {module}: expected A [r, d_in] and B [d_out, r], got "
                f"A {tuple(f.A.shape)} and B {tuple(f.B.shape)}; re-export the adapter"
            )
        by_shape.setdefault((f.A.shape[1], f.B.shape[0]), []).append(name)
    if len(by_shape) > 1:
        parts = "; ".join(
            f"d_in={i}, d_out={o}: {', '.join(ns)}" for (i, o), ns in sorted(by_shape.items())
        )
        raise LorashelfError(
            f"experts disagree on the shape of {module} ({parts}); they were trained on "
            "different base models: keep only experts of one base model"
        )
