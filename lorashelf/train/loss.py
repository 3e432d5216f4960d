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

from lorashelf.train.batches import Batch


def split_lm(
    lm: torch.nn.Module,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A ``*ForCausalLM``'s decoder stack and its hidden-states -> logits function."""
    get_base = getattr(lm, "get_base_model", None)  # through a PEFT wrapper
    lm = get_base() if callable(get_base) else lm
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(f"{type(lm).__name__} has no backbone/head; pass a *ForCausalLM model")
    scale = getattr(lm.config, "logit_scale", None)  # Cohere
    cap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return backbone, project


def target_nll(lm: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed NLL (fp32) of the batch's target tokens; divide by ``len(batch.labels)``."""
    backbone, project = split_lm(lm)
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state[batch.rows, batch.cols]  # [n_targets, hidden]
    logits = project(hidden).float()
    return F.cross_entropy(logits, batch.labels, reduction="sum")
