"""uniform and uniform-delta against PEFT's own computations; one expert; bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from lorashelf.merge import LoraFactors, TiesConfig, merge

PREFIX = "base_model.model."


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix(PREFIX): mod.get_delta_weight("default").detach()
        for name, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer)
    }


def test_uniform_equals_peft_model_with_averaged_factors(peft_experts, experts, base, input_ids):
    states = [get_peft_model_state_dict(m) for m in peft_experts]
    mean = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    averaged = copy.deepcopy(peft_experts[0])
    set_peft_model_state_dict(averaged, mean)
    merged = merge(experts, "uniform")
    assert all(isinstance(e, LoraFactors) and e.rank == 4 for e in merged.modules.values())
    with merged.apply(base):
        got = logits(base, input_ids)
    assert torch.allclose(got, logits(averaged, input_ids), atol=1e-4)


def test_uniform_delta_is_the_exact_mean_of_peft_deltas(peft_experts, experts, base, input_ids):
    per_expert = [peft_deltas(m) for m in peft_experts]
    mean = {k: torch.stack([d[k] for d in per_expert]).mean(0) for k in per_expert[0]}
    merged = merge(experts, "uniform-delta")
    assert all(e.rank == 3 * 4 for e in merged.modules.values())
    for name, dense in mean.items():
        assert torch.allclose(merged.delta(name), dense, atol=1e-6)

    manual = copy.deepcopy(base)
    with torch.no_grad():
        for name, dense in mean.items():
            manual.get_submodule(name).weight.add_(dense)
    with merged.apply(base):
        assert torch.allclose(logits(base, input_ids), logits(manual, input_ids), atol=1e-5)

    # the parameter average is a different model: it carries cross terms B_i A_j
    uniform = merge(experts, "uniform")
    name = next(iter(mean))
    gap = (uniform.delta(name) - mean[name]).norm() / mean[name].norm()
    assert gap > 0.1


def test_one_expert_merges_to_itself(peft_experts, experts):
    delta = peft_deltas(peft_experts[0])
    for method, cfg in [
        ("uniform", None),
        ("uniform-delta", None),
        ("ties", TiesConfig(density=1.0)),
        ("ties", TiesConfig(density=1.0, space="params")),
    ]:
        merged = merge(experts[:1], method, cfg)
        for name, dense in delta.items():
            assert torch.allclose(merged.delta(name), dense, atol=1e-6), (method, cfg)


@pytest.mark.parametrize("method", ["uniform", "uniform-delta", "ties"])
def test_bf16_model_and_factors(method, experts, tiny_model, input_ids):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    low = [
        {k: type(f)(f.A.bfloat16(), f.B.bfloat16(), f.scale) for k, f in e.items()} for e in experts
    ]
    merged = merge(low, method)
    name = merged.names()[0]
    assert merged.delta(name).dtype == torch.float32  # computed in fp32
    weight = model.get_submodule(name).weight
    original = weight.detach().clone()
    before = logits(model, input_ids)
    with merged.apply(model):
        assert weight.dtype == torch.bfloat16
        expected = (original.float() + merged.delta(name)).to(torch.bfloat16)
        assert torch.equal(weight, expected)
        during = logits(model, input_ids)
        assert torch.isfinite(during).all() and not torch.equal(during, before)
    assert torch.equal(weight, original)
    assert torch.equal(logits(model, input_ids), before)
