"""Sequence embeddings from a causal LM: its last hidden states, mean-pooled over real tokens.

What data-based expert embeddings (lorashelf.cluster.text) and retrieval routing
(lorashelf.route.retrieval, LoraRetriever: Zhao et al. 2024, arXiv 2402.09997) compare:
the base model itself is the encoder, so no extra model is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, hidden]`` float32: ``hidden [batch, T, d]`` averaged over the positions
    where ``mask [batch, T]`` is 1 (all positions without a mask)."""
    h = hidden.float()
    if mask is None:
        return h.mean(1)
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def mean_pooled(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> torch.Tensor:
    """[len(texts), hidden] float32: last hidden states averaged over each text's tokens."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        ids = [
            tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [0]
            for t in texts[s : s + batch_size]
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(ids), width, dtype=torch.long, device=device)
        for i, x in enumerate(ids):  # right padding; the mask keeps pads out of the mean
            input_ids[i, : len(x)] = torch.tensor(x, device=device)
            mask[i, : len(x)] = 1
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        out.append(masked_mean(hidden.hidden_states[-1], mask).cpu())
    return torch.cat(out)
