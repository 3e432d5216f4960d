"""Training examples as token ids, and the order and padding of their batches.

An example becomes ``prompt ids + target ids + EOS`` with the loss on the target and
EOS only. The prompt and the target are tokenized separately, exactly as the scorer
in ``lorashelf.evaluate`` does, so an expert is trained on the tokens it is later
scored on. Too-long examples lose tokens from the left of the prompt, never the
target. Batches are padded to their longest member (dynamic padding); with
``bucket`` the examples of a shuffled window are sorted by length before being cut
into batches, which removes most padding while the window keeps the order random.
The sort key is the prompt's length (:func:`bucket_lengths`), not the whole
sequence's: the target is part of the sequence, so sorting by total length puts
examples with the same answer into the same batch whenever the answers tokenize to
different lengths (BIG-bench sports_understanding: " implausible" is 3 tokens,
" plausible" 1), and a run of one-answer batches pulls the expert back and forth
between the two answers. The prompt is most of every sequence, so its length removes
nearly the same padding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorashelf.data.prompt import render
from lorashelf.data.task import Example

# Batches per bucketing window: large enough to find similar lengths, small enough
# that consecutive batches still mix the data.
WINDOW = 32


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; the last ``n_target`` ids carry the loss."""

    ids: tuple[int, ...]
    n_target: int


@dataclass
class Batch:
    """A padded batch and the (row, position) pairs whose next token is a target.

    ``labels[k]`` is the token at ``(rows[k], cols[k] + 1)``: the hidden state at
    ``cols[k]`` predicts it. ``attention_mask`` is None when nothing is padded.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    n_tokens: int  # real (non-pad) tokens, for throughput


def encode(tokenizer: Any, prompt: str, target: str, max_length: int, eos: bool = True) -> Encoded:
    """Ids of ``prompt + target (+ EOS)``, the prompt cut from the left to fit."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id is not None:
        t_ids = [*t_ids, tokenizer.eos_token_id]
    if not t_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    if len(t_ids) > max_length - 1:  # nothing else fits: keep the target's start
        t_ids = t_ids[: max_length - 1]
    if not p_ids:  # something must predict the first target token
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        p_ids = [start]
    keep = max_length - len(t_ids)
    p_ids = p_ids[-keep:]
    return Encoded(ids=(*p_ids, *t_ids), n_target=len(t_ids))


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, chat: bool = False
) -> list[Encoded]:
    """Encode each example's training target (mc: the gold option; gen: the first)."""
    return [
        encode(tokenizer, render(ex, tokenizer, chat), ex.target, max_length) for ex in examples
    ]


def bucket_lengths(encoded: Sequence[Encoded]) -> list[int]:
    """The length each example is bucketed by: its prompt's, so that batches do not
    group examples by their answer (see the module docstring)."""
    return [len(e.ids) - e.n_target for e in encoded]


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, bucket: bool = True
) -> Iterator[list[int]]:
    """Endless batches of example indices, epoch after epoch, fixed by ``seed``.

    ``lengths`` is what ``bucket`` sorts a window by (:func:`bucket_lengths`)."""
    rng = random.Random(seed)
    n = len(lengths)
    if n == 0:
        raise ValueError("no examples to batch")
    while True:
        idx = list(range(n))
        rng.shuffle(idx)
        batches: list[list[int]] = []
        span = batch_size * WINDOW if bucket else n
        for start in range(0, n, span):
            window = idx[start : start + span]
            if bucket:
                window.sort(key=lambda i: lengths[i])
            batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        if bucket:
            rng.shuffle(batches)
        yield from batches


def collate(encoded: Sequence[Encoded], pad_id: int, device: torch.device) -> Batch:
    """Right-pad to the longest sequence and list the positions that predict targets."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, e in enumerate(encoded):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        mask[r, :n] = 1
        first = n - e.n_target  # position of the first target token
        rows += [r] * e.n_target
        cols += range(first - 1, n - 1)
        labels += e.ids[first:]
    padded = bool((mask == 0).any())
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device) if padded else None,
        rows=torch.tensor(rows, device=device),
        cols=torch.tensor(cols, device=device),
        labels=torch.tensor(labels, device=device),
        n_tokens=int(mask.sum()),
    )
