"""Merge fixtures: LoRA experts made with PEFT on the tiny random Llama, read back as
factors ``{module path: (A [r, d_in], B [d_out, r], scale)}``.

The factors come straight from PEFT's own layers (``lora_A``/``lora_B`` weights and
``scaling``), independently of lorashelf's library reader.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor

# q_proj [64, 64], v_proj [32, 64] (2 kv heads), up_proj [128, 64]: three shapes.
TARGETS = ["q_proj", "v_proj", "up_proj"]
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Factors:
    A: Tensor
    B: Tensor
    scale: float


def peft_factors(model: PeftModel, adapter: str = "default") -> dict[str, Factors]:
    """Every LoRA layer of ``model`` as factors keyed by base-model module path."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out[name.removeprefix(PREFIX)] = Factors(
                A=mod.lora_A[adapter].weight.detach().clone(),
                B=mod.lora_B[adapter].weight.detach().clone(),
                scale=float(mod.scaling[adapter]),
            )
    return out


@pytest.fixture(scope="session")
def make_expert(tiny_model, kit) -> Callable[..., PeftModel]:
    """``make_expert(seed, r=4, alpha=8)``: a random (non-zero B) LoRA on a copy of the
    tiny model, on the three target shapes."""

    def make(seed: int, r: int = 4, alpha: int = 8) -> PeftModel:
        return kit.peft_lora(tiny_model, seed=seed, r=r, lora_alpha=alpha, target_modules=TARGETS)

    return make


@pytest.fixture(scope="session")
def peft_experts(make_expert) -> list[PeftModel]:
    return [make_expert(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="session")
def experts(peft_experts) -> list[dict[str, Factors]]:
    return [peft_factors(m) for m in peft_experts]


@pytest.fixture(scope="session")
def factors_of() -> Callable[..., dict[str, Factors]]:
    return peft_factors


@pytest.fixture(scope="session")
def input_ids() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (2, 12), generator=g)


@pytest.fixture
def base(tiny_model):
    """A fresh copy of the tiny model that a test may modify."""
    return copy.deepcopy(tiny_model)
