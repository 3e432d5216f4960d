"""The GGUF LoRA writer: llama.cpp's keys, names, orientation and q/k permutation.

The permutation is checked against an independent implementation: transformers'
GGUF loader, which undoes llama.cpp's q/k permutation when it dequantises a model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

from lorashelf.errors import LorashelfError
from lorashelf.export import export_adapter, read_base
from lorashelf.export.gguf import rope_permute

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
}


def undo_llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(weights, n_head, n_head)


def read(path):
    reader = GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items()}
    return kv, {t.name: np.array(t.data) for t in reader.tensors}, reader


def test_gguf_lora_keys_names_and_updates(library, base_dir, tmp_path):
    out = tmp_path / "c.gguf"
    done = export_adapter(library, "expert:c", "gguf", out, base=base_dir)
    kv, tensors, reader = read(out)
    assert kv["general.type"] == "adapter" and kv["general.architecture"] == "llama"
    assert kv["adapter.type"] == "lora"
    factors = library.get("c").lora_factors()
    assert done.modules == len(factors) == 2 * len(HF_TO_GGUF)
    rank = done.rank
    alpha = kv["adapter.lora.alpha"]
    assert alpha / rank == pytest.approx(factors["model.layers.0.self_attn.q_proj"].scale)
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    cfg = read_base(base_dir)
    for module, f in factors.items():
        layer, sub = module.removeprefix("model.layers.").split(".", 1)
        name = f"blk.{layer}.{HF_TO_GGUF[sub]}.weight"
        d_out, d_in = f.B.shape[0], f.A.shape[1]
        assert shapes[f"{name}.lora_a"] == [d_in, rank]  # ne[0] matches the weight's
        assert shapes[f"{name}.lora_b"] == [rank, d_out]
        delta = (alpha / rank) * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        if sub in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.n_head if "q_proj" in sub else cfg.n_kv_head
            assert not np.allclose(delta, f.delta().numpy(), atol=1e-4)  # it was permuted
            delta = undo_llama_cpp_permute(delta, heads)
        np.testing.assert_allclose(delta, f.delta().numpy(), atol=1e-5)


def test_rope_permute_is_the_inverse_of_transformers_unpermute():
    w = torch.randn(24, 5)
    for heads in (1, 2, 3, 6):
        back = undo_llama_cpp_permute(rope_permute(w, heads).numpy(), heads)
        np.testing.assert_array_equal(back, w.numpy())


def fake_base_gguf(path, hidden: int, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    """A GGUF "model" with only the weights' shapes (no usable values)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    kv = hidden // heads * kv_heads
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (48, hidden)), ("ffn_down", (hidden, 48))):  # fmt: skip
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_base_gguf_of_the_right_shapes_is_accepted_and_another_model_refused(library, tmp_path):
    good = fake_base_gguf(tmp_path / "good.gguf", hidden=32)
    assert export_adapter(library, "expert:a", "gguf", tmp_path / "a.gguf", base=good).modules
    other = fake_base_gguf(tmp_path / "other.gguf", hidden=64)
    with pytest.raises(LorashelfError, match="trained on another base model"):
        export_adapter(library, "expert:a", "gguf", tmp_path / "x.gguf", base=other)
    assert not (tmp_path / "x.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_overwrite_replaces_our_gguf_but_never_the_base_model(library, tmp_path):
    base = fake_base_gguf(tmp_path / "base.gguf", hidden=32)
    base_bytes = base.read_bytes()
    out = export_adapter(library, "expert:a", "gguf", tmp_path / "a.gguf", base=base).path
    with pytest.raises(LorashelfError, match="--overwrite"):
        export_adapter(library, "expert:b", "gguf", out, base=base)
    export_adapter(library, "expert:b", "gguf", out, base=base, overwrite=True)
    assert '"experts": ["b"]' in read(out)[0]["lorashelf.export"]
    with pytest.raises(LorashelfError, match="not a gguf export lorashelf wrote"):
        export_adapter(library, "expert:b", "gguf", base, base=base, overwrite=True)
    assert base.read_bytes() == base_bytes
