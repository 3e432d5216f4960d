"""Training prompts of a library's experts, read through the task ids on their cards.

Data-based methods represent an expert by what it was trained on: the text-embedding
clustering baseline (lorashelf.cluster.text) and retrieval routing (lorashelf.route.
retrieval, LoraRetriever: Zhao et al. 2024, arXiv 2402.09997) both take a few training
prompts per expert, in turn from each of its tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError


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
