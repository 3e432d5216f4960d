"""The few-shot examples a composition learns from: drawn, fingerprinted and tokenized.

LoraHub (Huang et al. 2023, arXiv 2307.13269) adapts to a task from about five
examples. Shots are drawn deterministically from a task's train split, so a seed names
the exact shots; their fingerprint goes into the composed expert's card. Tokenization
follows the trainer (lorashelf.train.batches): ``prompt ids + target ids (+ EOS)``
with the loss on the target tokens, the prompt and target tokenized separately, so a
composition is scored on the tokens the experts were trained on. The reference's
seq2seq labels end with ``</s>``; EOS after the target is the causal-LM equivalent.
Unlike training, nothing is cut: a shot longer than the model's context is an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorashelf.data.prompt import render
from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError


@dataclass(frozen=True)
class ShotBatch:
    """The shots right-padded into one batch (on the CPU; moved by the scorer).

    ``labels[k]`` is the token at ``(rows[k], cols[k] + 1)``: the hidden state at
    ``cols[k]`` predicts it; ``rows[k]`` is also the index of its shot.
    """

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    rows: torch.Tensor  # [T]
    cols: torch.Tensor  # [T]
    labels: torch.Tensor  # [T]
    n_targets: tuple[int, ...]  # target tokens per shot

    @property
    def n_examples(self) -> int:
        return int(self.input_ids.shape[0])


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 (16 hex digits) over the shots' prompts and targets, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.target]).encode())
    return h.hexdigest()[:16]


def draw_shots(task: Task, k: int, seed: int, split_seed: int = 0) -> tuple[Example, ...]:
    """``k`` shots from the task's train split (``task.splits(split_seed)``), fixed by ``seed``."""
    if k < 1:
        raise LorashelfError(f"--shots must be >= 1, got {k}")
    train = task.splits(seed=split_seed).train
    if len(train) < k:
        raise LorashelfError(
            f"task {task.id} has {len(train)} train examples, fewer than {k} shots; "
            "pass fewer --shots or use a larger task"
        )
    picked = random.Random(f"{task.key}:shots:{seed}").sample(range(len(train)), k)
    return tuple(train[i] for i in picked)


def model_context(model: torch.nn.Module) -> int | None:
    """The longest input the model's position embeddings cover, if it says."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _encode(tokenizer: Any, ex: Example, i: int, eos: bool, chat: bool) -> tuple[list, int]:
    p_ids = tokenizer(render(ex, tokenizer, chat), add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    if not t_ids:
        raise LorashelfError(f"shot {i}: its target {ex.target!r} tokenizes to nothing")
    if eos and tokenizer.eos_token_id is not None:
        t_ids = [*t_ids, tokenizer.eos_token_id]
    if not p_ids:  # something must predict the first target token
        start = tokenizer.bos_token_id
        p_ids = [start if start is not None else tokenizer.eos_token_id]
    return [*p_ids, *t_ids], len(t_ids)


def encode_shots(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_length: int | None,
    eos: bool = True,
    chat: bool = False,
) -> ShotBatch:
    """Tokenize and right-pad the shots; refuses no shots and shots that do not fit."""
    if len(examples) == 0:
        raise LorashelfError(
            "no examples to compose from; LoraHub needs a few (about 5) solved examples of the "
            "task (--shots N)"
        )
    encoded = [_encode(tokenizer, ex, i, eos, chat) for i, ex in enumerate(examples)]
    for i, (ids, _) in enumerate(encoded):
        if max_length is not None and len(ids) > max_length:
            raise LorashelfError(
                f"shot {i} is {len(ids)} tokens long but the model reads at most {max_length}; "
                "drop or shorten that example (compositions never cut a shot)"
            )
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, (ids, n_t) in enumerate(encoded):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        first = len(ids) - n_t
        rows += [r] * n_t
        cols += range(first - 1, len(ids) - 1)
        labels += ids[first:]
    return ShotBatch(
        input_ids=input_ids,
        attention_mask=mask,
        rows=torch.tensor(rows),
        cols=torch.tensor(cols),
        labels=torch.tensor(labels),
        n_targets=tuple(n for _, n in encoded),
    )
