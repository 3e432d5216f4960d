"""Fixtures for export tests: a tiny random Llama (4 heads, 2 KV heads, so q and k
permute differently), its config dir, and a library of real PEFT adapters made on it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorashelf.library import Library

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the library's recorded base
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_base() -> LlamaForCausalLM:
    """Session-scoped: never modify it (deep-copy first)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_base) -> Path:
    """The tiny base as a transformers model dir (config.json + weights)."""
    out = tmp_path_factory.mktemp("base")
    tiny_base.save_pretrained(out)
    return out


def save_adapter(base: torch.nn.Module, out: Path, seed: int, **lora) -> Path:
    """A PEFT adapter on ``base`` with random non-zero A and B, saved at ``out``."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS} | lora
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) | {"base_model_name_or_path": HUB_BASE}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture
def library(tmp_path, tiny_base) -> Library:
    """A library with experts a, b (rank 4) and c (rank 8, alpha 4: another scale)."""
    lib = Library.open(tmp_path / "lib", create=True, base_model=HUB_BASE, allow_mixed=True)
    for name, seed, kw in (("a", 1, {}), ("b", 2, {}), ("c", 3, {"r": 8, "lora_alpha": 4})):
        lib.add(save_adapter(tiny_base, tmp_path / f"src-{name}", seed, **kw), name)
    return lib


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
