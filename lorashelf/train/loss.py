"""The training loss: next-token NLL at target positions, with the LM head run only there.

A causal LM's output head maps every position to vocabulary logits; for SmolLM2
(49k tokens, hidden 576) that projection and its log-softmax are ~40% of a training
step, yet only the few positions that predict answer tokens carry loss. Here the
decoder stack runs on the whole batch and the head (with any final logit transform
of the family) runs on the gathered target positions only. The result equals the
masked cross-entropy of the full logits (checked against it in tests/train).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lorashelf.models.lm import backbone_and_head, unwrap_lm
from lorashelf.train.batches import Batch


def split_lm(
    lm: torch.nn.Module,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A ``*ForCausalLM``'s decoder stack and its hidden-states -> logits function
    (through a PEFT wrapper)."""
    return backbone_and_head(unwrap_lm(lm))


def target_nll(lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed NLL (fp32) of the batch's target tokens; divide by ``len(batch.labels)``."""
    backbone, project = split_lm(lm)
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state[batch.rows, batch.cols]  # [n_targets, hidden]
    logits = project(hidden).float()
    return F.cross_entropy(logits, batch.labels, reduction="sum")
