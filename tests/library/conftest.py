"""Fixtures for library tests: real PEFT adapters on a tiny random Llama, saved to tmp dirs.

Adapters are made the way users make them (``get_peft_model`` + ``save_pretrained``,
by the shared ``kit.write_adapter``), with random non-zero ``lora_B`` so every adapter
changes the model's output, and with ``base_model_name_or_path`` set deliberately (PEFT
would record the random model's empty name otherwise).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what smollm2-135m quantizes


AdapterFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(tiny_model, kit, tmp_path_factory) -> AdapterFactory:
    """``make_adapter(name, seed=0, base=HUB_BASE, **LoraConfig kwargs) -> PEFT dir``,
    made once per distinct request."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(name: str = "a", seed: int = 0, base: str | None = HUB_BASE, **kw) -> Path:
        key = (name, seed, base, json.dumps(kw, sort_keys=True, default=str))
        if key not in made:
            out = root / f"{name}-{len(made)}"
            made[key] = kit.write_adapter(tiny_model, out, seed=seed, base_id=base, **kw)
        return made[key]

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
