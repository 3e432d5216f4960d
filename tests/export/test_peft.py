"""PEFT exports load in PEFT and give lorashelf's own logits; vLLM's rank rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.export import VLLM_RANKS, export_adapter, for_vllm
from lorashelf.export.peft import vllm_problems
from lorashelf.lora import LoraFactors, attach
from lorashelf.merge import merge


def peft_logits(base, adapter_dir, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def lorashelf_logits(base, experts, weights, ids, mix="output"):
    model = copy.deepcopy(base)
    attach(model, experts, weights=weights, mix=mix)
    with torch.no_grad():
        return model(ids).logits


def test_expert_export_matches_lorashelf_and_differs_from_base(
    library, tiny_base, token_ids, tmp_path
):
    done = export_adapter(library, "expert:c", "peft", tmp_path / "c")
    got = peft_logits(tiny_base, done.path, token_ids)
    want = lorashelf_logits(tiny_base, [("c", library.get("c").lora_factors())], [1.0], token_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (got - tiny_base(token_ids).logits).abs().max() > 1e-2  # the adapter acts
    record = json.loads((done.path / "export.json").read_text())
    assert record["method"] == "expert:c" and record["experts"] == ["c"]


def test_weights_output_mix_is_the_weighted_sum_of_updates(library, tiny_base, token_ids, tmp_path):
    done = export_adapter(library, "weights:a=0.7,c=-0.3", "peft", tmp_path / "w")
    assert done.rank == 4 + 8  # exact by concatenation
    experts = [(n, library.get(n).lora_factors()) for n in ("a", "c")]
    want = lorashelf_logits(tiny_base, experts, [0.7, -0.3], token_ids)
    torch.testing.assert_close(
        peft_logits(tiny_base, done.path, token_ids), want, atol=1e-5, rtol=1e-5
    )


def test_uniform_export_matches_the_merge_folded_in(library, tiny_base, token_ids, tmp_path):
    done = export_adapter(library, "uniform", "peft", tmp_path / "u", experts=["a", "b"])
    merged = merge([library.get(n).lora_factors() for n in ("a", "b")], "uniform")
    model = copy.deepcopy(tiny_base)
    with merged.apply(model), torch.no_grad():
        want = model(token_ids).logits
    torch.testing.assert_close(
        peft_logits(tiny_base, done.path, token_ids), want, atol=1e-5, rtol=1e-5
    )


def test_vllm_target_pads_to_an_allowed_rank_without_changing_the_update(
    library, tiny_base, token_ids, tmp_path
):
    plain = export_adapter(library, "weights:a=0.5,c=0.5", "peft", tmp_path / "plain")
    done = export_adapter(library, "weights:a=0.5,c=0.5", "peft", tmp_path / "v", target="vllm")
    cfg = json.loads((done.path / "adapter_config.json").read_text())
    assert plain.rank == 12 and done.rank == cfg["r"] == 16 and 16 in VLLM_RANKS
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert vllm_problems(cfg) == []
    assert vllm_problems(json.loads((plain.path / "adapter_config.json").read_text())) == [
        "rank 12 is not one of (1, 8, 16, 32, 64, 128, 256, 320, 512)"
    ]
    assert len(vllm_problems(cfg | {"use_dora": True, "modules_to_save": ["lm_head"]})) == 2
    assert any("padded with zeros to 16" in c for c in done.changes)
    torch.testing.assert_close(
        peft_logits(tiny_base, done.path, token_ids),
        peft_logits(tiny_base, plain.path, token_ids),
        atol=1e-5,
        rtol=1e-5,
    )


def test_vllm_folds_mixed_scales_and_refuses_a_rank_above_512():
    g = torch.Generator().manual_seed(0)
    f = {
        "m.q": LoraFactors(torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g), 2.0),
        "m.v": LoraFactors(torch.randn(8, 5, generator=g), torch.randn(6, 8, generator=g), 0.5),
    }
    fixed = for_vllm(f)
    assert fixed.rank == 8 and {x.rank for x in fixed.factors.values()} == {8}
    assert len({x.scale for x in fixed.factors.values()}) == 1
    for m in f:
        torch.testing.assert_close(fixed.factors[m].delta(), f[m].delta())
    big = {"m.q": LoraFactors(torch.zeros(513, 4), torch.zeros(4, 513), 1.0)}
    with pytest.raises(LorashelfError, match="pass --rank 512"):
        for_vllm(big)
