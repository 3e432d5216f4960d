"""One forward pass, many compositions: the per-row plan that the attached layers read.

The server attaches every expert of its libraries once, with
:func:`lorashelf.lora.attach` in routed mode, plus low-rank "virtual experts" (uniform
merges). Each adapted module gets a :class:`BatchRouter`: for every batch row it
returns either that row's fixed weight vector (one expert one-hot, an explicit
weighting, a virtual expert one-hot, all zeros for the base model) broadcast over
the row's tokens, or, for routed rows, the weights of the row's Arrow/PHATGOOSE
router, token by token. So requests with different experts, merges and routers run
in one batched forward pass and the mixture layer is unchanged. Merges that are not
low rank (TIES deltas) are added by :class:`DeltaLinear`, a thin ``nn.Linear`` that
sits under the mixture layer and adds a dense delta to its rows only.

The engine sets a :class:`BatchPlan` (one :class:`RowSpec` per row, resolved to
column indices) before each forward and narrows it when rows finish.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RowSpec:
    """What one row composes: fixed weights by column name, or a router, plus a delta."""

    fixed: tuple[tuple[str, float], ...] = ()  # (column name, weight); empty: base
    routed: Hashable | None = None  # key of a router group (see Bank.routers_for)
    dense: Hashable | None = None  # key of a dense merge delta (see Bank.deltas_for)
    # key of the virtual experts this row needs attached (a low-rank merge, or the
    # experts a router rewrites, e.g. GenKnowSub's)
    virtual: Hashable | None = None
    # key of a retrieval router: the engine embeds the row's prompt and the bank turns
    # the row into fixed weights (or Arrow among the retrieved experts) before prefill
    retrieve: Hashable | None = None


@dataclass
class BatchPlan:
    """The current batch, row by row, in the form the layers read."""

    device: torch.device
    fixed: torch.Tensor | None = None  # [B, E_total] (zero rows for routed rows)
    routed: list[tuple[Hashable, torch.Tensor]] = field(default_factory=list)  # key, rows
    dense: list[tuple[Hashable, torch.Tensor]] = field(default_factory=list)
    routers: dict[Hashable, dict[str, tuple[Any, torch.Tensor]]] = field(default_factory=dict)
    deltas: dict[Hashable, dict[str, torch.Tensor]] = field(default_factory=dict)
    record: torch.Tensor | None = None  # [B, E_total]: summed last-position weights
    recorded: int = 0  # module calls summed into ``record`` since the last reset
    off: bool = False  # the plain base model, whatever the batch (see Bank.base_pass)

    def set_rows(self, specs: Sequence[RowSpec], columns: dict[str, int], record: bool) -> None:
        """Lay ``specs`` out as tensors (routers and deltas are set by the bank)."""
        fixed = torch.zeros(len(specs), max(len(columns), 1))
        routed: dict[Hashable, list[int]] = {}
        dense: dict[Hashable, list[int]] = {}
        for i, spec in enumerate(specs):
            for name, w in spec.fixed:
                fixed[i, columns[name]] = w
            if spec.routed is not None:
                routed.setdefault(spec.routed, []).append(i)
            if spec.dense is not None:
                dense.setdefault(spec.dense, []).append(i)
        self.fixed = fixed.to(self.device)
        self.routed = [(k, torch.tensor(r, device=self.device)) for k, r in routed.items()]
        self.dense = [(k, torch.tensor(r, device=self.device)) for k, r in dense.items()]
        self.record = torch.zeros_like(self.fixed) if record else None
        self.recorded = 0

    def reset_record(self) -> None:
        if self.record is not None:
            self.record.zero_()
            self.recorded = 0

    def routing(self) -> torch.Tensor | None:
        """Each row's weights of the last forward's last position, averaged over modules."""
        if self.record is None or self.recorded == 0:
            return None
        return self.record / self.record.sum(-1, keepdim=True).clamp_min(1e-12)


class BatchRouter:
    """The router of one adapted module: each row's fixed weights, or its router's."""

    top_k: int | None = None  # dense weights: the mixture layer takes its dense path

    def __init__(self, module: str, members: torch.Tensor, plan: BatchPlan) -> None:
        self.module = module
        self.members = members  # bank columns of the experts stacked at this module
        self.plan = plan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.off:
            return x.new_zeros(*x.shape[:-1], self.members.numel())
        assert plan.fixed is not None, "the engine sets the plan before each forward"
        fixed = plan.fixed.index_select(1, self.members).to(x.dtype)  # [B, E_m]
        w = fixed.view(fixed.shape[0], *([1] * (x.dim() - 2)), -1).expand(*x.shape[:-1], -1)
        if plan.routed:
            w = w.clone()
            for key, rows in plan.routed:
                entry = plan.routers[key].get(self.module)
                if entry is None:  # none of the group's experts adapts this module
                    continue
                router, cols = entry
                sub = w.index_select(0, rows)
                sub[..., cols] = router(x.index_select(0, rows)).to(w.dtype)
                w = w.index_copy(0, rows, sub)
        if plan.record is not None:
            last = w.reshape(w.shape[0], -1, w.shape[-1])[:, -1].float()
            plan.record.index_add_(1, self.members, last)
            plan.recorded += 1
        return w


class DeltaLinear(nn.Linear):
    """A base ``nn.Linear`` that also adds a dense merge delta to the rows that ask for it.

    It shares the original layer's parameters (no copy); :meth:`original` gives the
    layer back.
    """

    def __init__(self, base: nn.Linear, module: str, plan: BatchPlan) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.module = module
        self.plan = plan
        self._original = base

    def original(self) -> nn.Linear:
        return self._original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.plan.off:
            return y
        for key, rows in self.plan.dense:
            delta = self.plan.deltas[key].get(self.module)
            if delta is not None:
                extra = nn.functional.linear(x.index_select(0, rows).to(delta.dtype), delta)
                y = y.index_add(0, rows, extra.to(y.dtype))
        return y
