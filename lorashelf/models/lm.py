"""Find the pieces of a causal LM that scoring, training and composition need: the backbone that
returns hidden states and the output head (with any final logit transform).

Models arrive plain (``LlamaForCausalLM``), wrapped by PEFT (``PeftModel``), or with
lorashelf's mixture layers attached in place; all three expose the same backbone
once unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def unwrap_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module inside a PEFT wrapper (LoRA layers stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone_and_head(
    lm: torch.nn.Module,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The decoder stack and a function mapping hidden states to logits.

    Applies the final-logit transforms some families use (Cohere's ``logit_scale``,
    Gemma 2's soft-capping) so the fast path equals ``lm(...).logits``.
    """
    prefix = getattr(lm, "base_model_prefix", "model")
    backbone = getattr(lm, prefix, None)
    head = lm.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(f"{type(lm).__name__} has no backbone/head; pass a *ForCausalLM model")
    cfg = lm.config
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return backbone, project
