"""Plain-text corpora from tasks' inputs: what general-knowledge experts train on.

GenKnowSub (lorashelf.route.genknowsub) subtracts the mean of "general knowledge"
adapters, LoRAs trained on plain general-domain text (the paper uses Wikipedia), from
every task expert before routing. :func:`write_text_corpus` makes such a corpus from
the inputs of tasks the user names, as a JSONL the ``jsonl`` source reads back:
one ``{"input": "", "target": TEXT}`` row per text, so training puts the loss on the
whole text (plain language modelling). Texts are the tasks' rendered prompts from
the split asked for (the train split by default, so held-out examples never enter),
stripped, deduplicated, cut to ``max_chars`` at a word boundary, and taken from the
tasks in turn. A task's canary string (BIG-bench's) is copied into every row's
``canary`` field, which the reader ignores. The file is written through a temporary
file and a rename, so an interrupted run never leaves half a corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lorashelf.errors import LorashelfError


def plain_texts(
    tasks: Sequence[str],
    home: Path,
    *,
    n: int,
    max_chars: int = 1200,
    split: str = "train",
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Up to ``n`` (text, canary) pairs, round-robin over ``tasks``' ``split`` inputs."""
    from lorashelf.data import load_task

    per_task = []
    for tid in tasks:
        task = load_task(tid, home=home)
        examples = task.splits(seed=seed).get(split)
        texts = [_cut(" ".join(ex.prompt.split()), max_chars) for ex in examples]
        per_task.append(([t for t in texts if t], task.canary))
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for i in range(max((len(t) for t, _ in per_task), default=0)):
        for texts, canary in per_task:
            if i < len(texts) and texts[i] not in seen and len(out) < n:
                seen.add(texts[i])
                out.append((texts[i], canary))
    if not out:
        raise LorashelfError(
            f"the {split} split of {', '.join(tasks)} has no input text; name tasks whose "
            "examples have prompts (e.g. bigbench:disfl_qa, Wikipedia paragraphs)"
        )
    return out


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[: head.rfind(" ")] if " " in head else head


def write_text_corpus(path: Path, texts: Sequence[tuple[str, str]]) -> Path:
    """Write ``texts`` ((text, canary) pairs) as a training JSONL at ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text, canary in texts:
            row = {"input": "", "target": text} | ({"canary": canary} if canary else {})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
