"""The mixture kernel for a LoraHub population: per-sequence parameter mixing at rank r.

A population of candidate weightings is scored in one forward pass, one weight row per
sequence (lorashelf.compose.scoring). With ``mix="params"`` each row's factors are mixed
first (``A_b = sum_e w_be A_e``, ``B_b = sum_e w_be scale_e B_e``, rank r) and applied,
so the LoRA branch costs rank r per token instead of the dense path's E*r. Sequences
with the same weight row (a candidate's shots) go through one 2-D matmul per distinct
row, so a candidate's result has the same shape however many candidates share the
batch and does not depend on them (a batched matmul's kernel choice does, which bf16
models amplify). Without autograd the sum is written into the base output in place,
rounded once to its dtype, and the mixed factors are cached by the distinct rows'
values, so a population scored in two passes (a shared prompt prefix, then the rest of
the shots) mixes its factors once. :func:`lorashelf.lora.attach` takes an instance as
``per_sequence=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MixCache:
    """One layer's mixed factors for the distinct weight rows they were mixed with."""

    rows: torch.Tensor
    key: tuple
    factors: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PopulationKernel:
    """``kernel(layer, x, w, y)``: ``y`` plus the per-sequence params mix of ``layer``
    (a :class:`lorashelf.lora.MixtureLinear`) with one weight row per sequence of ``x``."""

    caches: dict[str, MixCache] = field(default_factory=dict)

    def __call__(self, layer, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        groups = layer.state.row_groups(x.device)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        in_place = not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        y3 = y.reshape(*x3.shape[:2], y.shape[-1])
        out = (
            y3 if in_place else y3.new_empty(y3.shape, dtype=torch.promote_types(y.dtype, x.dtype))
        )
        factors = self._mixed(layer, w, groups, x.dtype)
        for (a, b), rows in zip(factors, groups.spans):
            delta = (x3[rows].flatten(0, 1) @ a.T @ b.T).view(-1, *y3.shape[1:])
            if not in_place:
                out[rows] = y3[rows] + delta
            elif isinstance(rows, slice):
                out[rows].add_(delta)  # computed in float32 when delta is, rounded once
            else:
                out[rows] = (y3[rows] + delta).to(y.dtype)
        return out.to(y.dtype).reshape(y.shape)

    def _mixed(self, layer, w: torch.Tensor, groups, dtype: torch.dtype) -> list[tuple]:
        """Each weight group's mixed factors ``(sum_e w_e A_e, sum_e w_e scale_e B_e)``."""
        e, r = layer.n_local, layer.rank
        cacheable = not w.requires_grad
        key = (dtype, layer.A_all.data_ptr(), layer.B_all.data_ptr())
        if cacheable:
            c = self.caches.get(layer.name)
            if (
                c is not None
                and c.key == key
                and c.rows.shape == groups.rows.shape
                and torch.equal(c.rows, groups.rows)
            ):
                return c.factors
        wb = w.reshape(w.shape[0], e)
        A = layer.A_all.to(dtype).view(e, r, -1)
        B = layer.B_all.to(dtype).view(-1, e, r)
        factors = [
            (torch.einsum("e,erd->rd", wb[i], A), torch.einsum("e,oer->or", wb[i], B))
            for i in groups.first
        ]
        if cacheable:
            self.caches[layer.name] = MixCache(groups.rows, key, factors)
        return factors
