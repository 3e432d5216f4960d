"""Attach a fresh LoRA to a loaded base model with PEFT, and take it off again.

``attached(model, config, base_id)`` wraps the model with ``peft.get_peft_model``
for the length of a ``with`` block and afterwards unloads the LoRA layers and
restores the parameters' ``requires_grad`` flags and the train/eval mode, so one
loaded base can train many experts in a row. LoRA ``A`` matrices are initialised
from ``init_seed`` and the module's name alone (the same Kaiming-uniform range PEFT
uses, ``U(-1/sqrt(d_in), 1/sqrt(d_in))``), independent of the global RNG, the device,
the order modules are created in and which other modules are targeted: experts of a
library that share ``init_seed`` start from the same ``A`` on every module they
share (Ostapenko et al. 2024 train all experts from one initialisation).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorashelf.errors import LorashelfError
from lorashelf.train.config import TrainConfig

ADAPTER = "default"


def lora_config(config: TrainConfig) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=config.peft_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def module_seed(init_seed: int, name: str) -> int:
    """A 63-bit seed from (init_seed, module path), stable across runs and machines."""
    digest = hashlib.sha256(f"{init_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lora_modules(peft_model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(base-model module path, LoRA layer) pairs, e.g. "model.layers.0.self_attn.q_proj"."""
    prefix = "base_model.model."
    for name, mod in peft_model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER in lora_a:
            yield name.removeprefix(prefix), mod


@torch.no_grad()
def init_lora_a(peft_model: torch.nn.Module, init_seed: int) -> None:
    """Set every ``lora_A`` from ``init_seed`` and its module path; ``lora_B`` stays 0."""
    for name, mod in lora_modules(peft_model):
        weight = mod.lora_A[ADAPTER].weight  # [r, d_in]
        gen = torch.Generator().manual_seed(module_seed(init_seed, name))
        bound = 1.0 / math.sqrt(weight.shape[1])
        fresh = torch.empty(weight.shape, dtype=torch.float32).uniform_(
            -bound, bound, generator=gen
        )
        weight.copy_(fresh.to(device=weight.device, dtype=weight.dtype))
        mod.lora_B[ADAPTER].weight.zero_()


@contextmanager
def attached(model: torch.nn.Module, config: TrainConfig, base_id: str) -> Iterator[PeftModel]:
    """``model`` with a fresh trainable LoRA (fp32 weights); restored on exit."""
    if isinstance(model, PeftModel) or getattr(model, "peft_config", None):
        raise LorashelfError(
            "the base model already carries PEFT adapters; train on a freshly loaded base model"
        )
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            peft_model = get_peft_model(model, lora_config(config))
    except ValueError as e:  # e.g. target modules not found in this architecture
        raise LorashelfError(
            f"cannot put LoRA on {config.target_modules} of {type(model).__name__} ({e}); "
            "pass --target-modules with module names of this model, or all-linear"
        ) from None
    try:
        # get_peft_model records the model's own path; the library wants the canonical id
        peft_model.peft_config[ADAPTER].base_model_name_or_path = base_id
        for p in peft_model.parameters():  # fp32 master weights whatever the base dtype
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        init_lora_a(peft_model, config.init_seed)
        yield peft_model
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        model.train(was_training)
