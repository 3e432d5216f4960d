"""The running batch between decode steps, and the KV-cache surgery continuous batching
needs: joining two batches whose caches have different lengths (both left-padded with
masked zeros to the longer one, so every row still attends to its own tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """The running rows and their state between steps: KV cache, attention mask (as
    wide as the cache), each row's last position and its next-token logits."""

    rows: list[Any]  # the engine's rows
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor  # [B, 1]
    logits: torch.Tensor  # [B, V] float32


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: ids, attention mask and position ids counting
    only real tokens (``cumsum(mask) - 1``), so each row sees what it would alone."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def joinable(batch: Batch | None) -> bool:
    """New rows can join a batch whose cache is plain per-layer keys/values tensors."""
    if batch is None:
        return True
    from transformers.cache_utils import DynamicLayer

    layers = getattr(batch.cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def concat(a: Batch | None, b: Batch | None) -> Batch | None:
    """One batch of ``a``'s rows then ``b``'s, both left-padded to the longer cache."""
    if a is None or b is None:
        return a if b is None else b
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_left_pad(la.keys, width, -2), _left_pad(lb.keys, width, -2)])
        la.values = torch.cat([_left_pad(la.values, width, -2), _left_pad(lb.values, width, -2)])
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)])
    return Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.positions, b.positions]),
                  torch.cat([a.logits, b.logits]))  # fmt: skip


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros in front along ``dim`` up to ``width`` (masked positions)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()
