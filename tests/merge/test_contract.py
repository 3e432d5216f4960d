"""Every registered merge method honours the same contract, and user errors read well."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from lorashelf.config import from_dict
from lorashelf.errors import LorashelfError
from lorashelf.merge import MERGES, Merged, TiesConfig, UniformConfig, merge


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", MERGES.names())
def test_merge_contract(method, experts, base, input_ids, tmp_path):
    merged = merge(experts, method)
    assert isinstance(merged, Merged) and merged.method == method
    assert merged.n_experts == len(experts)
    assert set(merged.names()) == set().union(*experts)
    assert isinstance(merged.config, MERGES.get(method).config_cls)

    before = logits(base, input_ids)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with merged.apply(base) as handle:
        assert handle.active
        during = logits(base, input_ids)
    assert not handle.active
    assert (during - before).abs().max() > 1e-2  # the merge did change the model
    assert torch.equal(logits(base, input_ids), before)
    assert all(torch.equal(v, weights[k]) for k, v in base.state_dict().items())

    # full rank (every module here has min(d_out, d_in) <= 64) makes dense saves exact too
    rank = None if merged.is_low_rank else 64
    err = merged.save_peft(tmp_path / "merged", "tiny-llama", rank=rank)
    assert err < 1e-5
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged").eval()
    assert torch.allclose(logits(loaded, input_ids), during, atol=1e-4)
    meta = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert meta["method"] == method and meta["n_experts"] == len(experts)
    assert from_dict(MERGES.get(method).config_cls, meta["config"]) == merged.config
    cfg = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama"


def test_restore_after_error_inside_context(experts, base, input_ids):
    before = logits(base, input_ids)
    with pytest.raises(RuntimeError), merge(experts, "uniform").apply(base):
        raise RuntimeError("boom")
    assert torch.equal(logits(base, input_ids), before)


def test_apply_to_peft_wrapped_model_folds_into_base_layer(experts, peft_experts):
    model = copy.deepcopy(peft_experts[0])
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule("base_model.model." + name).base_layer
    original = layer.weight.detach().clone()
    merged = merge(experts, "uniform-delta")
    with merged.apply(model):
        assert torch.allclose(layer.weight, original + merged.delta(name), atol=1e-6)
    assert torch.equal(layer.weight, original)


def test_config_as_dict_and_defaults(experts):
    assert merge(experts, "ties").config == TiesConfig()
    assert merge(experts, "ties", {"density": 0.5, "scope": "module"}).config == TiesConfig(
        density=0.5, scope="module"
    )


def _drop(expert, name):
    return {k: v for k, v in expert.items() if k != name}


def test_empty_and_mismatched_experts(experts):
    with pytest.raises(LorashelfError, match="at least one expert"):
        merge([], "uniform")
    name = "model.layers.1.mlp.up_proj"
    with pytest.raises(LorashelfError, match=f"expert 1 .*lacks {name}"):
        merge([experts[0], _drop(experts[1], name)], "uniform")
    with pytest.raises(LorashelfError, match=f"expert 1 .*adds {name}"):
        merge([_drop(experts[0], name), experts[1]], "ties")
    wrong = dict(experts[1])
    f = wrong[name]
    wrong[name] = type(f)(A=f.A[:, :32], B=f.B, scale=f.scale)
    with pytest.raises(LorashelfError, match=rf"module {name}: .*\[128, 64\].*\[128, 32\]"):
        merge([experts[0], wrong], "uniform-delta")


def test_unknown_method_and_bad_config(experts):
    with pytest.raises(LorashelfError, match="did you mean: ties"):
        merge(experts, "tie")
    with pytest.raises(LorashelfError, match="takes a TiesConfig"):
        merge(experts, "ties", UniformConfig())
    with pytest.raises(LorashelfError, match="did you mean: density"):
        merge(experts, "ties", {"densty": 0.5})
    with pytest.raises(LorashelfError, match="density must be in"):
        TiesConfig(density=0.0)
    with pytest.raises(LorashelfError, match="space must be"):
        TiesConfig(space="weights")


def test_parameter_space_merges_need_equal_ranks(experts, make_expert, factors_of):
    low = factors_of(make_expert(7, r=2, alpha=4))
    for method, cfg in [("uniform", None), ("ties", TiesConfig(space="params"))]:
        with pytest.raises(LorashelfError, match="ranks \\[4, 2\\].*uniform-delta"):
            merge([experts[0], low], method, cfg)
    mixed = merge([experts[0], low], "uniform-delta")
    assert {e.rank for e in mixed.modules.values()} == {6}
    merge([experts[0], low], "ties")  # delta space is rank-free


def test_apply_to_a_model_without_the_modules(experts):
    merged = merge(experts, "uniform")
    with pytest.raises(LorashelfError, match="has no module"):
        merged.apply(torch.nn.Sequential(torch.nn.Linear(64, 64)))
