"""Log-likelihood scoring of continuations, batched, with the LM head evaluated only
where it is needed.

Multiple-choice evaluation (as in BIG-bench and lm-evaluation-harness) scores each
option by the log-probability of its tokens given the prompt. The plain way runs the
full model and a full-vocabulary log-softmax over every position of every sequence;
for a 49k-token vocabulary that head is most of the work. Here the backbone runs
once per (prompt, option) pair, packed into length-sorted batches with dynamic
padding, and the head + log-softmax run only on the positions that predict option
tokens. Options of one question share their prompt: with ``share_prompt`` the prompt
runs once (left-padded, explicit position ids) and each option continues from a copy
of its key/value cache, so a 5-option question costs one prompt instead of five.
``fast=False`` keeps the plain computation as the reference the tests and
``bench/eval_throughput.py`` compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lorashelf.models.lm import backbone_and_head, unwrap_lm


@dataclass(frozen=True)
class Scored:
    """Log-probability of one continuation: summed over its ``n_tokens`` tokens."""

    logprob: float
    n_tokens: int


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and how many trailing ids are the continuation.

    The prompt and continuation are tokenized separately (then concatenated), so the
    continuation's tokens are the same for every prompt; too-long inputs lose tokens
    from the left of the prompt, never from the continuation.
    """
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not c_ids:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
    keep = max_length - len(c_ids)
    if keep < 1:
        c_ids = c_ids[: max_length - 1]
        keep = 1
    ids = p_ids[-keep:] + c_ids
    return ids, len(c_ids)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(
    seqs: list[list[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence (on the left when ``left``): ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    fast: bool = True,
    share_prompt: bool = True,
) -> list[Scored]:
    """Sum log-probability of each continuation given its prompt.

    Works with any causal LM (plain, PEFT-wrapped, or with lorashelf's mixture
    layers attached), on the device the model lives on.
    """
    if fast and share_prompt:
        return _score_shared(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    lm = unwrap_lm(model)
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_pair(tokenizer, p, c, max_length) for p, c in pairs]
    out: list[Scored | None] = [None] * len(pairs)
    for batch in _batches([len(e[0]) for e in encoded], batch_size):
        ids, mask = pad_batch([encoded[i][0] for i in batch], pad_id, device)
        n_cont = [encoded[i][1] for i in batch]
        lens = [len(encoded[i][0]) for i in batch]
        # positions t whose output predicts token t+1 of the continuation
        rows = torch.tensor([r for r, n in enumerate(n_cont) for _ in range(n)], device=device)
        cols = torch.tensor(
            [lens[r] - n - 1 + j for r, n in enumerate(n_cont) for j in range(n)], device=device
        )
        targets = ids[rows, cols + 1]
        if fast:
            backbone, head = backbone_and_head(lm)
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            logp_rows = head(hidden[rows, cols]).float().log_softmax(-1)
        else:  # the plain reference: full-vocabulary log-softmax at every position
            logp_all = lm(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            logp_rows = logp_all[rows, cols]
        logp = logp_rows.gather(-1, targets[:, None])[:, 0]
        sums = torch.zeros(len(batch), device=device).index_add_(0, rows, logp)
        for r, i in enumerate(batch):
            out[i] = Scored(logprob=float(sums[r]), n_tokens=n_cont[r])
    return [s for s in out if s is not None]


def _group_by_prompt(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """Unique prompts (token ids, left-truncated to fit the longest continuation) with
    the (pair index, continuation ids) that follow each."""
    groups: dict[str, list[tuple[int, list[int]]]] = {}
    for i, (prompt, cont) in enumerate(pairs):
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise ValueError(f"continuation {cont!r} tokenizes to nothing")
        groups.setdefault(prompt, []).append((i, c_ids[: max_length - 1]))
    out = []
    for prompt, conts in groups.items():
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        keep = max(1, max_length - max(len(c) for _, c in conts))
        out.append((p_ids[-keep:], conts))
    return out


@torch.no_grad()
def _score_shared(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
) -> list[Scored]:
    lm = unwrap_lm(model)
    backbone, head = backbone_and_head(lm)
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups = _group_by_prompt(tokenizer, pairs, max_length)
    out: list[Scored | None] = [None] * len(pairs)
    for batch in _batches([len(g[0]) for g in groups], batch_size):
        ids, mask = pad_batch([groups[g][0] for g in batch], pad_id, device, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        conts = [(r, i, c) for r, g in enumerate(batch) for i, c in groups[g][1]]
        rep = torch.tensor([r for r, _, _ in conts], device=device)
        cache = first.past_key_values
        cache.reorder_cache(rep)  # one cache row per continuation
        c_ids, c_mask = pad_batch([c for _, _, c in conts], pad_id, device)
        plen = mask.sum(-1)[rep]
        c_pos = plen[:, None] + torch.arange(c_ids.shape[1], device=device)[None]
        full_mask = torch.cat([mask[rep], c_mask], dim=1)
        second = backbone(
            input_ids=c_ids, attention_mask=full_mask, position_ids=c_pos, past_key_values=cache
        ).last_hidden_state
        # token j of a continuation is predicted by the prompt's last state (j = 0)
        # or by the continuation's state j - 1
        hidden = torch.cat([first.last_hidden_state[:, -1][rep][:, None], second[:, :-1]], dim=1)
        keep = c_mask.bool()
        logp = head(hidden[keep]).float().log_softmax(-1)
        logp = logp.gather(-1, c_ids[keep][:, None])[:, 0]
        rows = torch.arange(len(conts), device=device)[:, None].expand_as(c_mask)[keep]
        sums = torch.zeros(len(conts), device=device).index_add_(0, rows, logp)
        for n, (_, i, c) in enumerate(conts):
            out[i] = Scored(logprob=float(sums[n]), n_tokens=len(c))
    return [s for s in out if s is not None]
