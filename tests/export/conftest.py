"""Fixtures for export tests: the shared tiny random Llama at the GGUF tests' sizes (4
heads, 2 KV heads, so q and k permute differently), its config dir, and a library of
real PEFT adapters made on it by the shared adapter factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from lorashelf.library import Library

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the library's recorded base
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_base(kit) -> LlamaForCausalLM:
    """The shared tiny Llama at hidden 32, MLP 48, vocab 96 (the GGUF tests' shapes).
    Session-scoped: never modify it (deep-copy first)."""
    return kit.make_model(vocab_size=96, hidden=32, intermediate=48)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_base) -> Path:
    """The tiny base as a transformers model dir (config.json + weights)."""
    out = tmp_path_factory.mktemp("base")
    tiny_base.save_pretrained(out)
    return out


@pytest.fixture
def save_adapter(kit):
    """``save_adapter(base, out, seed, **LoraConfig fields)``: a PEFT adapter on ``base``
    with random non-zero A and B on every target, recorded for ``HUB_BASE``."""

    def save(base: torch.nn.Module, out: Path, seed: int, **lora) -> Path:
        lora = {"target_modules": TARGETS} | lora
        return kit.write_adapter(base, out, seed=seed, base_id=HUB_BASE, **lora)

    return save


@pytest.fixture
def library(tmp_path, tiny_base, save_adapter) -> Library:
    """A library with experts a, b (rank 4) and c (rank 8, alpha 4: another scale)."""
    lib = Library.open(tmp_path / "lib", create=True, base_model=HUB_BASE, allow_mixed=True)
    for name, seed, kw in (("a", 1, {}), ("b", 2, {}), ("c", 3, {"r": 8, "lora_alpha": 4})):
        lib.add(save_adapter(tiny_base, tmp_path / f"src-{name}", seed, **kw), name)
    return lib


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
