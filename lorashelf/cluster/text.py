"""Data-based expert embeddings: what the base model "sees" in each expert's tasks.

An alternative to MBC's parameter similarity that needs no trained expert at all:
each expert is represented by the base model's mean-pooled last hidden states over up
to N training prompts of its tasks (task ids come from the expert's card), averaged
and L2-normalised. Close to the task-embedding baselines that MBC is compared with
(Ostapenko et al. 2024, arXiv 2405.11157, sec. 4.1), computed with the base model
itself so no extra encoder is needed.

``mean_pooled`` (lorashelf.models.embed) and ``expert_prompts`` (lorashelf.data.samples) are
shared with retrieval routing (lorashelf.route.retrieval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lorashelf.data.samples import expert_prompts
from lorashelf.models.embed import mean_pooled


def text_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    center: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """[n_experts, hidden] L2-normalised mean of each expert's prompt embeddings.

    ``center`` subtracts the mean over experts first: a causal LM's hidden states share
    a large common direction, which would put every cosine near 1.
    """
    rows = []
    for ps in tqdm(prompts, desc="embedding prompts", disable=not progress, leave=False):
        e = mean_pooled(model, tokenizer, ps, batch_size=batch_size, max_length=max_length)
        rows.append(e.mean(0))
    emb = torch.stack(rows)
    if center and len(rows) > 1:
        emb = emb - emb.mean(0, keepdim=True)
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


__all__ = ["expert_prompts", "mean_pooled", "text_embeddings"]
