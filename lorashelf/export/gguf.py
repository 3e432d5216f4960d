"""Write one adapter as a llama.cpp LoRA file (GGUF), the form llama.cpp, its server,
Ollama and LM Studio load with ``--lora``.

The file follows what llama.cpp's ``convert_lora_to_gguf.py`` writes and what
``src/llama-adapter.cpp`` checks on load: ``general.type = adapter``,
``general.architecture`` equal to the base model's, ``adapter.type = lora``, one float
``adapter.lora.alpha``, and for each adapted weight ``W`` of the base GGUF (named as the
converter names it, ``blk.N.attn_q.weight``) a pair ``W.lora_a`` (our ``A``, numpy
``[r, d_in]``, so GGUF ``ne = [d_in, r]``, its ``ne[0]`` matching ``W``'s) and
``W.lora_b`` (our ``B``, ``[d_out, r]``). llama.cpp scales every pair by
``alpha / r`` with ``r`` the pair's own rank, so all modules are padded to one rank and
per-module scales are folded into ``B`` (:func:`lorashelf.export.peft.one_rank`).

For the ``llama`` architecture the converter permutes the rows of ``q_proj`` and
``k_proj`` (Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one, per
head group: ``reshape(n_head, 2, d/2/n_head, -1).swapaxes(1, 2)``). A LoRA update
``B A`` of such a weight must be permuted the same way; permuting the rows of ``B``
does exactly that. (transformers undoes the permutation when it dequantises a GGUF, so
lorashelf's own model, and its adapters, are in the Hugging Face layout.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorashelf.errors import LorashelfError
from lorashelf.export.peft import one_rank
from lorashelf.lora import LoraFactors

ARCHITECTURES = {"LlamaForCausalLM": "llama"}  # HF class -> llama.cpp architecture
MARKER_KEY = "lorashelf.export"  # our record in the file; also marks files we may replace


@dataclass(frozen=True)
class GgufBase:
    """What the writer needs to know of the base model the adapter will run on."""

    arch: str
    n_layer: int
    n_head: int
    n_kv_head: int
    # GGUF tensor name -> (ne[0], ne[1]) = (d_in, d_out); empty when read from a config
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    source: str = ""


def read_base(path: str | os.PathLike[str]) -> GgufBase:
    """Architecture, head counts and weight shapes of a base model GGUF file or a
    transformers model dir (``config.json``)."""
    path = Path(path)
    if path.is_dir():
        return _base_from_config(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LorashelfError(
            f"cannot read {path} as a GGUF model ({e}); pass the base .gguf"
        ) from None
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tok")}
    arch = str(kv.get("general.architecture", ""))
    if kv.get("general.type", "model") != "model" or arch not in ARCHITECTURES.values():
        raise LorashelfError(
            f"{path} is a {kv.get('general.type')} GGUF of architecture {arch!r}; export "
            f"for a base model of architecture {', '.join(sorted(set(ARCHITECTURES.values())))}"
        )
    shapes = {
        t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors if len(t.shape) == 2
    }
    n_head = int(kv[f"{arch}.attention.head_count"])
    return GgufBase(
        arch=arch,
        n_layer=int(kv[f"{arch}.block_count"]),
        n_head=n_head,
        n_kv_head=int(kv.get(f"{arch}.attention.head_count_kv", n_head)),
        shapes=shapes,
        source=str(path),
    )


def _base_from_config(path: Path) -> GgufBase:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise LorashelfError(f"{path} has no config.json; pass the base .gguf file") from None
    hf_arch = (cfg.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise LorashelfError(
            f"base {path} is a {hf_arch}; GGUF export supports {', '.join(ARCHITECTURES)}"
        )
    n_head = int(cfg["num_attention_heads"])
    return GgufBase(
        arch=ARCHITECTURES[hf_arch],
        n_layer=int(cfg["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
        source=str(path),
    )


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (see the module doc), applied to ``[d_out, ...]``."""
    d_out = rows.shape[0]
    return (
        rows.reshape(n_head, 2, d_out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def gguf_tensors(
    factors: Mapping[str, LoraFactors], base: GgufBase
) -> tuple[dict[str, np.ndarray], float]:
    """The ``.lora_a``/``.lora_b`` arrays (float32) under llama.cpp's names, and alpha."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == base.arch)
    names = get_tensor_name_map(arch, base.n_layer)
    rank = max(f.rank for f in factors.values())
    padded = one_rank(factors, rank)
    out: dict[str, np.ndarray] = {}
    for module, f in padded.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise LorashelfError(
                f"module {module} has no llama.cpp tensor in the {base.arch} architecture; "
                "export an adapter of the attention and MLP projections only"
            )
        d_in, d_out = f.A.shape[1], f.B.shape[0]
        if base.shapes and base.shapes.get(name) != (d_in, d_out):
            found = base.shapes.get(name)
            raise LorashelfError(
                f"{module} is [{d_out}, {d_in}] but the base GGUF {base.source} has "
                f"{'no ' + name if found is None else f'{name} of ne {list(found)}'}; the "
                "adapter was trained on another base model: export against its own base"
            )
        B = f.B
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            B = rope_permute(B, base.n_head if "attn_q" in name else base.n_kv_head)
        out[f"{name}.lora_a"] = f.A.float().contiguous().numpy()
        out[f"{name}.lora_b"] = B.float().contiguous().numpy()
    return out, float(padded[next(iter(padded))].scale * rank)


def write_gguf_lora(
    factors: Mapping[str, LoraFactors],
    out: str | os.PathLike[str],
    base: GgufBase,
    *,
    record: Mapping[str, Any] | None = None,
    name: str = "lorashelf adapter",
) -> Path:
    """Write ``factors`` as a llama.cpp LoRA adapter file at ``out``."""
    from gguf import GGUFType, GGUFWriter, Keys

    if not factors:
        raise LorashelfError("nothing to write: the adapter has no modules")
    tensors, alpha = gguf_tensors(factors, base)
    out = Path(out)
    writer = GGUFWriter(str(out), base.arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(MARKER_KEY, json.dumps(dict(record or {}), sort_keys=True))
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def is_our_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF LoRA adapter this module wrote (safe to replace)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except (OSError, ValueError, IndexError):
        return False
    return MARKER_KEY in fields and fields["general.type"].contents() == "adapter"
