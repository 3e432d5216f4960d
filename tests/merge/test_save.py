"""save_peft: exact for low-rank merges, best rank-k SVD truncation otherwise."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel

from lorashelf.errors import LorashelfError
from lorashelf.merge import LoraFactors, Merged, UniformConfig, merge


def best_rank_k(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float, float]:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    approx = (U[:, :k] * S[:k]) @ Vh[:k]
    return approx.float(), float((S[k:] ** 2).sum()), float((S**2).sum())


def loaded_deltas(base, path, factors_of) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    return {n: f.scale * f.B @ f.A for n, f in factors_of(model).items()}


@pytest.mark.parametrize("method", ["ties", "uniform-delta"])
def test_truncation_is_the_best_rank_k_and_reports_its_error(
    method, experts, base, factors_of, tmp_path
):
    merged = merge(experts, method)  # dense (ties) or rank 12 (uniform-delta)
    k = 3
    err = merged.save_peft(tmp_path / "m", "tiny", rank=k)
    got = loaded_deltas(base, tmp_path / "m", factors_of)
    tail = total = 0.0
    for name in merged.names():
        approx, t, n = best_rank_k(merged.delta(name), k)
        tail, total = tail + t, total + n
        assert torch.allclose(got[name], approx, atol=1e-5)
    assert err == pytest.approx(math.sqrt(tail / total), rel=1e-4)
    assert 0.05 < err < 1
    meta = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert meta["rank"] == k and meta["relative_truncation_error"] == pytest.approx(err)


def test_mixed_ranks_and_scales_round_trip_exactly(base, factors_of, tmp_path):
    g = torch.Generator().manual_seed(0)
    specs = {  # module -> (rank, scale)
        "model.layers.0.self_attn.q_proj": (4, 2.0),
        "model.layers.1.self_attn.q_proj": (4, 2.0),
        "model.layers.1.self_attn.v_proj": (2, 0.5),
        "model.layers.0.mlp.up_proj": (8, 1.25),
    }
    modules = {}
    for name, (r, scale) in specs.items():
        d_out, d_in = base.get_submodule(name).weight.shape
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        modules[name] = LoraFactors(A=A, B=B, scale=scale)
    merged = Merged("uniform", UniformConfig(), 1, modules)
    assert merged.save_peft(tmp_path / "m", "tiny") == 0.0
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["rank_pattern"]) == 2
    got = loaded_deltas(base, tmp_path / "m", factors_of)
    assert set(got) == set(specs)
    for name in specs:
        assert torch.allclose(got[name], merged.delta(name), atol=1e-5)


def test_save_refuses_dense_without_rank_and_existing_dirs(experts, tmp_path):
    with pytest.raises(LorashelfError, match="pass rank=K"):
        merge(experts, "ties").save_peft(tmp_path / "t", "tiny")
    merged = merge(experts, "uniform")
    merged.save_peft(tmp_path / "u", "tiny")
    with pytest.raises(LorashelfError, match="already holds an adapter"):
        merged.save_peft(tmp_path / "u", "tiny")
    merged.save_peft(tmp_path / "u", "tiny", overwrite=True)


def test_library_reader_reads_saved_merges(experts, tmp_path):
    factors = pytest.importorskip("lorashelf.library.factors")
    for method, rank in [("uniform", None), ("uniform-delta", None), ("ties", 5)]:
        merged = merge(experts, method)
        merged.save_peft(tmp_path / method, "tiny", rank=rank)
        read = factors.read_lora_factors(tmp_path / method)
        assert set(read) == set(merged.names())
        if rank is None:
            for name, f in read.items():
                assert torch.allclose(f.scale * f.B @ f.A, merged.delta(name), atol=1e-6)
        # the merge result is itself valid input for another merge
        assert merge([read, read], "uniform").names() == merged.names()
