"""Fixtures for routing tests: a fresh copy of the shared tiny Llama per test (tests
attach layers to it in place), random LoRA experts on it and token ids.

The factors, the PEFT writer and the reader come from the shared ``kit``
(tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from lorashelf.lora import LoraFactors


@pytest.fixture
def model(tiny_model) -> LlamaForCausalLM:
    """A fresh tiny Llama per test (tests attach layers to it in place)."""
    return copy.deepcopy(tiny_model)


@pytest.fixture
def shapes(model: LlamaForCausalLM, kit) -> dict[str, tuple[int, int]]:
    return kit.module_shapes(model)


@pytest.fixture
def experts(shapes, kit) -> list[tuple[str, dict[str, LoraFactors]]]:
    """Four random rank-4 experts on q_proj and v_proj of both layers."""
    return [(f"e{i}", kit.random_factors(shapes, seed=i)) for i in range(4)]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(7))
