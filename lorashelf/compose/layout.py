"""How a candidate's shots are fed to the model: their common prompt prefix once.

A candidate's loss needs the hidden states that predict the shots' target tokens, and
those need every earlier token of the same shot. Right-padded, as the reference feeds
them, ``N`` shots cost ``N x longest`` tokens per candidate. The shots of one task
mostly start with the same instruction, so the *prefix* layout runs the shots' common
prefix once per candidate (``p`` tokens, keeping its keys and values in a KV cache),
then the shots' remaining tokens as one right-padded batch that attends to that
cache: ``p + N x (longest - p)`` tokens. Positions, keys and attention masks are those
of the padded batch, so every hidden state is the one the padded batch computes; on
the CPU even bit for bit in bf16, because the suffix block keeps the padded batch's
width and sdpa then sees the same key layout, and the prefix pass is right-padded to
a multiple of :data:`PREFIX_ALIGN` tokens (masked, then cropped from the cache): the
CPU kernel rounds a trailing partial block of keys differently, which changed losses
by up to 5e-3 in bf16 without the padding. On logical_deduction/three_objects
(5 shots) that is 307 tokens per candidate instead of 410.

``padded`` is the same code with an empty prefix (one pass, the reference's batch).
``auto`` uses the prefix when the shots share at least :data:`MIN_PREFIX` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from lorashelf.compose.config import LAYOUTS
from lorashelf.compose.shots import ShotBatch
from lorashelf.errors import LorashelfError

# below this many shared tokens a second forward pass costs more than it saves
MIN_PREFIX = 4
# the prefix pass is right-padded to a multiple of this many tokens (see above)
PREFIX_ALIGN = 8


@dataclass(frozen=True)
class ShotLayout:
    """The shots as ``prefix_ids [1, p + pad]`` (run once per candidate, the first
    ``prefix`` tokens real, the pad masked by ``prefix_mask``) and ``input_ids
    [N, W]`` (the rest of each shot, right-padded), with ``attention_mask [N, p + W]``
    over prefix and rest. The hidden state predicting target ``k`` sits at
    ``(shot[k], col[k])`` of the concatenated ``[prefix, rest]`` sequence: the
    column it has in the padded batch."""

    prefix: int
    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    shot: torch.Tensor
    col: torch.Tensor
    labels: torch.Tensor
    n_targets: tuple[int, ...]

    @property
    def name(self) -> str:
        return "prefix" if self.prefix else "padded"

    @property
    def n_shots(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Tokens fed per candidate, padding included."""
        return int(self.prefix_ids.shape[1] if self.prefix else 0) + int(self.input_ids.numel())

    def to(self, device: torch.device) -> ShotLayout:
        tensors = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return replace(self, **{k: getattr(self, k).to(device) for k in tensors})


def common_prefix(shots: ShotBatch) -> int:
    """Tokens every shot starts with (at most the batch width - 1: the rest of the
    shots must not be empty)."""
    ids, mask = shots.input_ids, shots.attention_mask.bool()
    agree = ((ids == ids[:1]) & mask & mask[:1]).all(0).long().cumprod(0)
    return min(int(agree.sum()), ids.shape[1] - 1)


def prefixed(shots: ShotBatch, p: int) -> ShotLayout:
    """The layout with the first ``p`` tokens (shared by all shots) fed once."""
    width = -(-p // PREFIX_ALIGN) * PREFIX_ALIGN
    prefix_ids = shots.input_ids[:1, :1].repeat(1, width)  # pad: any token, masked
    prefix_ids[:, :p] = shots.input_ids[:1, :p]
    prefix_mask = (torch.arange(width) < p).long()[None]
    return ShotLayout(
        prefix=p,
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        input_ids=shots.input_ids[:, p:],
        attention_mask=shots.attention_mask,
        shot=shots.rows,
        col=shots.cols,
        labels=shots.labels,
        n_targets=shots.n_targets,
    )


def choose_layout(shots: ShotBatch, how: str = "auto") -> ShotLayout:
    """``padded`` (the reference's batch), ``prefix`` (common prefix once), or
    ``auto``: the prefix when the shots share at least MIN_PREFIX tokens."""
    if how not in LAYOUTS:
        raise LorashelfError(f"unknown shot layout {how!r}; use one of {', '.join(LAYOUTS)}")
    p = 0 if how == "padded" else common_prefix(shots)
    if how == "auto" and p < MIN_PREFIX:
        p = 0
    return prefixed(shots, p)
