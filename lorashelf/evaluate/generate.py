"""Greedy decoding for generative tasks, batched with left padding.

Generation stops at the end-of-sequence token or a newline (BIG-bench answers are one
line; small models otherwise run on into the next "Q:"), and at a token budget set
from the longest reference answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lorashelf.evaluate.scoring import pad_batch
from lorashelf.models.lm import unwrap_lm


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the first newline."""
    lm = unwrap_lm(model)
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(p)["input_ids"][-(max_length - max_new_tokens) :] for p in prompts]
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in batch], pad_id, device, left=True)
        width = ids.shape[1]  # left padding: every row ends where its prompt ends
        gen = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=["\n"],
            tokenizer=tokenizer,
        )
        for r, i in enumerate(batch):
            text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
            out[i] = text.split("\n", 1)[0].strip()
    return out
