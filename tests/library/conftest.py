"""Fixtures for library tests: real PEFT adapters on a tiny random Llama, saved to tmp dirs.

Adapters are made the way users make them (``get_peft_model`` + ``save_pretrained``),
with random non-zero ``lora_B`` so every adapter changes the model's output, and with
``base_model_name_or_path`` set deliberately (PEFT would record the random model's
empty name otherwise).
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what smollm2-135m quantizes


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """Session-scoped: never modify it (adapters are made on deep copies)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def peft_model(base: torch.nn.Module, seed: int = 0, **lora_kwargs):
    """A PeftModel on a copy of ``base`` whose LoRA weights are all random and non-zero."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | lora_kwargs
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


AdapterFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(tiny_llama: LlamaForCausalLM, tmp_path_factory) -> AdapterFactory:
    """``make_adapter(name, seed=0, base=HUB_BASE, **LoraConfig kwargs) -> PEFT dir``."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(name: str = "a", seed: int = 0, base: str | None = HUB_BASE, **kw) -> Path:
        key = (name, seed, base, json.dumps(kw, sort_keys=True, default=str))
        if key in made:
            return made[key]
        out = root / f"{name}-{len(made)}"
        peft_model(tiny_llama, seed, **kw).save_pretrained(str(out))
        # set the base afterwards: a hub id in the config makes save_pretrained look it up
        cfg_path = out / "adapter_config.json"
        cfg_path.write_text(
            json.dumps(
                json.loads(cfg_path.read_text()) | {"base_model_name_or_path": base}, indent=2
            )
        )
        made[key] = out
        return out

    return make


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of adapter dir ``src`` at ``dst`` with adapter_config.json fields changed."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text()) | changes
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the index with its bytes, and the index's rows."""
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("index.sqlite")
    }
    con = sqlite3.connect(root / "index.sqlite")
    rows = con.execute("SELECT * FROM experts ORDER BY name").fetchall()
    con.close()
    return {"files": files, "rows": rows}


@pytest.fixture
def edit_config() -> Callable[..., Path]:
    """``edit_config(src, dst, **fields)``: copy an adapter dir with config fields changed."""
    return _edit_config


@pytest.fixture
def snapshot() -> Callable[[Path], dict]:
    """``snapshot(library_dir)``: its files and index rows, to assert nothing changed."""
    return _snapshot
