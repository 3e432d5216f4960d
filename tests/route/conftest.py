"""Fixtures for routing tests: a tiny random Llama, random LoRA factors and real PEFT
adapter directories written from given factors (so PEFT itself can load them).

Factors are read back from PEFT directories with lorashelf.library.factors when it
exists, else with a small local reader of PEFT's format (lora_A/lora_B weights,
scale = lora_alpha / r, or / sqrt(r) with rslora).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from lorashelf.library.factors import LoraFactors, read_lora_factors
except ImportError:  # the library helper's module has not landed yet

    @dataclass(frozen=True)
    class LoraFactors:  # type: ignore[no-redef]
        A: torch.Tensor
        B: torch.Tensor
        scale: float

    def read_lora_factors(peft_dir):  # type: ignore[no-redef]
        cfg = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
        sd = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
        out = {}
        for key, a in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            b = sd[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(module.split(".")[-1], cfg["lora_alpha"])
            out[module] = LoraFactors(
                a, b, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            )
        return out


TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def module_shapes(model: torch.nn.Module, targets=TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (d_out, d_in)} of the model's linear layers named in ``targets``."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    }


def random_factors(
    shapes: dict[str, tuple[int, int]],
    r: int = 4,
    *,
    seed: int = 0,
    scale: float = 2.0,
    size: float = 0.3,
    gap: bool = False,
) -> dict[str, LoraFactors]:
    """Random factors per module. ``gap`` gives singular values 1, 0.1, 0.05, ... so the
    top singular vector is well separated (power iteration converges in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in shapes.items():
        if gap:
            qa = torch.linalg.qr(torch.randn(d_in, r, generator=g)).Q
            qb = torch.linalg.qr(torch.randn(d_out, r, generator=g)).Q
            s = torch.tensor([1.0] + [0.1 / (i + 1) for i in range(r - 1)])
            A, B = (s[:, None] * qa.T) * size, qb * size
        else:
            A = torch.randn(r, d_in, generator=g) * size / math.sqrt(d_in)
            B = torch.randn(d_out, r, generator=g) * size
        out[m] = LoraFactors(A.contiguous(), B.contiguous(), scale)
    return out


def write_peft_adapter(
    model: torch.nn.Module, factors: dict[str, LoraFactors], out_dir: Path, *, alpha: float
) -> Path:
    """A PEFT LoRA directory holding exactly ``factors`` (one rank, one scale)."""
    r = next(iter(factors.values())).A.shape[0]
    targets = sorted({m.split(".")[-1] for m in factors})
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if name in factors:
                module.lora_A["default"].weight.copy_(factors[name].A)
                module.lora_B["default"].weight.copy_(factors[name].B)
    peft.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture
def model() -> LlamaForCausalLM:
    """A fresh tiny Llama per test (tests attach layers to it in place)."""
    return tiny_llama()


@pytest.fixture
def shapes(model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    return module_shapes(model)


@pytest.fixture
def experts(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, dict[str, LoraFactors]]]:
    """Four random rank-4 experts on q_proj and v_proj of both layers."""
    return [(f"e{i}", random_factors(shapes, seed=i)) for i in range(4)]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for tests (conftest modules are not importable by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        LoraFactors=LoraFactors,
        read_lora_factors=read_lora_factors,
        tiny_llama=tiny_llama,
        module_shapes=module_shapes,
        random_factors=random_factors,
        write_peft_adapter=write_peft_adapter,
    )
