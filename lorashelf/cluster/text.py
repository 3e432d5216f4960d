"""Data-based expert embeddings: what the base model "sees" in each expert's tasks.

An alternative to MBC's parameter similarity that needs no trained expert at all:
each expert is represented by the base model's mean-pooled last hidden states over up
to N training prompts of its tasks (task ids come from the expert's card), averaged
and L2-normalised. Close to the task-embedding baselines that MBC is compared with
(Ostapenko et al. 2024, arXiv 2405.11157, sec. 4.1), computed with the base model
itself so no extra encoder is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError


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
        last = hidden.hidden_states[-1].float()
        m = mask[..., None].to(last.dtype)
        out.append(((last * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out)


def expert_prompts(
    cards: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    *,
    home: Path,
    max_prompts: int = 32,
    split_seed: int = 0,
) -> list[list[str]]:
    """Up to ``max_prompts`` training prompts per expert, taken in turn from its tasks."""
    task_ids = {name: [str(t) for t in cards[name].get("tasks") or []] for name in names}
    for name, ids in task_ids.items():
        if not ids:
            raise LorashelfError(
                f"expert {name!r} records no tasks in its card, so the embedding method has no "
                "prompts for it; use --method mbc, or re-add it with its tasks"
            )
    from lorashelf.data import load_task

    tasks: dict[str, list[str]] = {}
    out = []
    for name in names:
        ids = task_ids[name]
        for t in ids:
            if t not in tasks:
                tasks[t] = [ex.prompt for ex in load_task(t, home=home).splits(split_seed).train]
        per_task = [tasks[t] for t in ids]
        prompts = [p for row in zip(*_pad(per_task)) for p in row if p is not None]
        if not prompts:
            raise LorashelfError(
                f"the tasks of expert {name!r} ({', '.join(ids)}) have no training examples"
            )
        out.append(prompts[:max_prompts])
    return out


def _pad(lists: list[list[str]]) -> list[list[str | None]]:
    width = max(len(x) for x in lists)
    return [x + [None] * (width - len(x)) for x in lists]


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
