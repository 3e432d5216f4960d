"""What all mixture layers of one attachment share: weights or routing, caches, recorder.

One :class:`MixtureState` per :func:`lorashelf.lora.attach`. Its caches are named
dataclasses, each keyed by what invalidates it: ``version`` is bumped by every
``set_weights``/``set_routers``, a tensor's ``_version`` by in-place edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CastCache:
    """The last layer input cast to ``lora_dtype`` (q, k and v read the same tensor)."""

    source: torch.Tensor
    source_version: int
    cast: torch.Tensor


@dataclass
class RowGroups:
    """Per-sequence weights grouped by identical rows (a candidate's shots)."""

    key: tuple
    spans: list[Any]  # a slice when the rows are contiguous, else an index tensor
    first: list[int]  # the first row of each group
    rows: torch.Tensor  # the distinct rows, in group order


@dataclass
class MixtureState:
    """Shared by every layer of one attachment."""

    n_experts: int
    mix: str = "output"
    strategy: str = "auto"
    weights: torch.Tensor | None = None  # (E,) or (batch, E)
    routed: bool = False
    recorder: Any = None  # lorashelf.route.stats.Recorder while recording
    lora_dtype: torch.dtype | None = None  # LoRA-branch precision; None = activations'
    version: int = 0  # bumped by every set_weights/set_routers (invalidates layer caches)
    # per-sequence params-mix kernel chosen at attach time (LoraHub's population scorer,
    # lorashelf.compose.population); None computes it with the dense path
    per_sequence: Callable[..., torch.Tensor] | None = None
    _cast: CastCache | None = None
    _groups: RowGroups | None = None

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in ``lora_dtype``, cast once for all the layers that read the same
        tensor (a transformer's q, k and v projections)."""
        if x.dtype == self.lora_dtype:
            return x
        if x.is_inference():  # no version counter to tell an in-place edit: cast anew
            return x.to(self.lora_dtype)
        c = self._cast
        if c is None or c.source is not x or c.source_version != x._version:
            c = self._cast = CastCache(x, x._version, x.to(self.lora_dtype))
        return c.cast

    def row_groups(self, device: torch.device) -> RowGroups:
        """For per-sequence weights: the groups of identical weight rows (computed once
        per ``set_weights``)."""
        w = self.weights
        assert w is not None and w.dim() == 2
        key = (self.version, w._version, str(device))
        if self._groups is None or self._groups.key != key:
            _, inverse = torch.unique(w.detach().cpu(), dim=0, return_inverse=True)
            groups: dict[int, list[int]] = {}
            for i, g in enumerate(inverse.tolist()):
                groups.setdefault(g, []).append(i)
            spans, first = [], []
            for rows in sorted(groups.values()):  # in order of first appearance
                contiguous = rows[-1] - rows[0] + 1 == len(rows)
                spans.append(
                    slice(rows[0], rows[-1] + 1)
                    if contiguous
                    else torch.tensor(rows, device=device)
                )
                first.append(rows[0])
            self._groups = RowGroups(key, spans, first, w.detach()[first].clone())
        return self._groups
