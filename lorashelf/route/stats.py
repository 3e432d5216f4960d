"""Routing statistics: the mean weight each expert receives, per module and overall.

While recording, every mixture layer adds the weights it used (router, fixed or
per-sequence) summed over the real tokens of the batch. Padding is excluded with the
batch's attention mask, captured by a forward pre-hook on the model and on its
backbone (the scorer calls the backbone directly); a layer seeing ``q`` new tokens
(a continuation over a KV cache, or one generation step) uses the mask's last ``q``
columns, which is where HF models put the current tokens. Sums stay on the device
(no synchronisation per layer) until the statistics are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorashelf.lora.state import MixtureState


class RoutingStats:
    """Accumulated routing weights of one recording (e.g. one task's evaluation)."""

    def __init__(self, expert_names: list[str]) -> None:
        self.expert_names = list(expert_names)
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}

    def add(self, module: str, members: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> None:
        """Add weights ``w [..., E_m]`` of the tokens where ``valid [...]`` is true."""
        mask = valid.to(w.device, torch.float32).unsqueeze(-1)
        summed = (w.float().expand(*valid.shape, w.shape[-1]) * mask).flatten(0, -2).sum(0)
        if module not in self._sums:
            self._sums[module] = torch.zeros(len(self.expert_names), device=w.device)
            self._tokens[module] = torch.zeros((), device=w.device)
        self._sums[module].index_add_(0, members.to(w.device), summed)
        self._tokens[module] += mask.sum()

    @property
    def tokens(self) -> int:
        """Real tokens seen (by the most-visited module)."""
        return int(max((float(t) for t in self._tokens.values()), default=0))

    def per_module(self) -> dict[str, list[float]]:
        """Mean weight of each expert over the real tokens, per module path."""
        return {
            m: (s.cpu().double() / max(float(self._tokens[m]), 1.0)).tolist()
            for m, s in sorted(self._sums.items(), key=lambda kv: _natural(kv[0]))
        }

    def per_layer(self) -> dict[str, list[float]]:
        """Mean over the modules of each transformer block (``...layers.N.``)."""
        groups: dict[str, list[list[float]]] = {}
        for m, w in self.per_module().items():
            hit = re.search(r"layers\.(\d+)\.", m)
            groups.setdefault(hit.group(1) if hit else m, []).append(w)
        return {k: torch.tensor(v).mean(0).tolist() for k, v in groups.items()}

    def overall(self) -> list[float]:
        """Mean over modules of the per-module mean weights."""
        rows = list(self.per_module().values())
        if not rows:
            return [0.0] * len(self.expert_names)
        return torch.tensor(rows, dtype=torch.float64).mean(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "experts": self.expert_names,
            "tokens": self.tokens,
            "overall": self.overall(),
            "per_layer": self.per_layer(),
            "per_module": self.per_module(),
        }


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


class Recorder:
    """Connects the mixture layers to a :class:`RoutingStats` and the current mask."""

    def __init__(self, stats: RoutingStats) -> None:
        self.stats = stats
        self.mask: torch.Tensor | None = None

    def add(self, module: str, members: torch.Tensor, w: torch.Tensor, lead: torch.Size) -> None:
        m = self.mask
        if m is not None and len(lead) == 2 and m.shape[0] == lead[0] and m.shape[1] >= lead[1]:
            valid = m[:, m.shape[1] - lead[1] :].bool()
        else:
            valid = torch.ones(lead, dtype=torch.bool, device=w.device)
        self.stats.add(module, members, w, valid)

    def capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@contextmanager
def recording(
    model: nn.Module, state: MixtureState, expert_names: list[str]
) -> Iterator[RoutingStats]:
    """Record routing weights of every forward pass run inside the ``with`` block."""
    if state.recorder is not None:
        raise RuntimeError("already recording routing statistics on this model")
    recorder = Recorder(RoutingStats(expert_names))
    hooked = [model]
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        hooked.append(backbone)
    hooks = [m.register_forward_pre_hook(recorder.capture_mask, with_kwargs=True) for m in hooked]
    state.recorder = recorder
    try:
        yield recorder.stats
    finally:
        state.recorder = None
        for h in hooks:
            h.remove()
