"""read_lora_factors against PEFT's own get_delta_weight, on real PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorashelf.errors import LorashelfError
from lorashelf.library import LoraFactors, read_lora_factors
from lorashelf.library.factors import pattern_value


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """PEFT's dense update of every LoRA layer, keyed by the base model's module path."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): mod.get_delta_weight("default")
        for name, mod in model.named_modules()
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A
    }


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
    "patterns": {
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
        "alpha_pattern": {"k_proj": 3, "layers.1.self_attn.q_proj": 16},
    },
    "rslora+patterns": {"use_rslora": True, "rank_pattern": {"q_proj": 8}},
}


def load_peft(base, adapter_dir):
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


@pytest.mark.parametrize("case", CASES)
def test_factors_match_peft_delta_weight(case, tiny_model, make_adapter):
    src = make_adapter(case, seed=3, **CASES[case])
    want = peft_deltas(load_peft(tiny_model, src))
    got = read_lora_factors(src)
    assert list(got) == sorted(want, key=lambda m: (int(m.split(".")[2]), m))  # layer order
    for module, f in got.items():
        assert isinstance(f, LoraFactors)
        assert f.A.shape == (f.rank, tiny_model.config.hidden_size) and f.B.shape[1] == f.rank
        torch.testing.assert_close(f.delta(), want[module], rtol=1e-5, atol=1e-7)
    # the same from a state dict and its config, cast on the way
    import json

    sd = load_file(str(src / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    again = read_lora_factors(sd, cfg, dtype=torch.float64)
    for module, f in again.items():
        assert f.A.dtype == torch.float64 and f.scale == got[module].scale
        torch.testing.assert_close(f.delta().float(), want[module], rtol=1e-5, atol=1e-7)


def test_patterns_give_per_module_rank_and_scale(make_adapter):
    got = read_lora_factors(make_adapter("patterns", seed=3, **CASES["patterns"]))
    assert got["model.layers.0.self_attn.q_proj"].rank == 2
    assert got["model.layers.0.self_attn.q_proj"].scale == 8 / 2
    assert got["model.layers.1.self_attn.q_proj"].scale == 16 / 4
    assert got["model.layers.0.self_attn.k_proj"].scale == 3 / 4
    assert got["model.layers.1.self_attn.v_proj"].scale == 8 / 6
    rs = read_lora_factors(make_adapter("rslora", seed=3, **CASES["rslora"]))
    assert all(f.scale == pytest.approx(4 / 8**0.5) for f in rs.values())


def test_dora_and_other_peft_types_are_refused(make_adapter, edit_config, tmp_path):
    with pytest.raises(LorashelfError, match="DoRA"):
        read_lora_factors(make_adapter("dora", use_dora=True))
    ia3 = edit_config(make_adapter("plain"), tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(LorashelfError, match="peft_type 'IA3'"):
        read_lora_factors(ia3)
    sd = load_file(str(make_adapter("dora", use_dora=True) / "adapter_model.safetensors"))
    with pytest.raises(LorashelfError, match="DoRA"):  # weights alone give it away too
        read_lora_factors(sd, {"peft_type": "LORA", "r": 4, "lora_alpha": 8})


def test_config_rank_disagreeing_with_weights_is_refused(make_adapter, edit_config, tmp_path):
    bad = edit_config(make_adapter("plain"), tmp_path / "bad", r=8)
    with pytest.raises(LorashelfError, match="rank 8 but its weights have rank 4"):
        read_lora_factors(bad)


def test_pattern_value_follows_peft_matching():
    pats = {"q_proj": 2, "layers.1.self_attn.v_proj": 3}
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 9) == 2
    assert pattern_value(pats, "model.layers.1.self_attn.v_proj", 9) == 3
    assert pattern_value(pats, "model.layers.0.self_attn.v_proj", 9) == 9
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 9) == 9  # whole names only


def test_live_model_state_dict_with_adapter_names(tiny_model, make_adapter):
    src = make_adapter("plain", seed=3)
    model = load_peft(tiny_model, src)
    live = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert any(".lora_A.default.weight" in k for k in live)
    got = read_lora_factors(live, model.peft_config["default"].to_dict())
    want = read_lora_factors(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[m].A, want[m].A) and got[m].scale == want[m].scale for m in got)
