"""Our composition computes what the LoraHub reference computes, batched or not.

The reference (sail-sg/lorahub ``get_score``) sums the experts' PEFT state dicts with
the candidate's weights, loads the sum into a PeftModel with
``set_peft_model_state_dict`` and takes the model's loss. Here that construction is
rebuilt with PEFT alone and compared with the mixture, the composed factors and the
population scorer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lorashelf.compose import PopulationScorer, composed_factors, encode_shots, resolve_experts
from lorashelf.lora import attach

WEIGHTS = [0.7, -1.2, 0.3, 1.4]


def reference_model(tiny_model, lib, weights):
    """PeftModel whose LoRA is sum_i w_i A_i, sum_i w_i B_i (the reference's merge)."""
    names = lib.names()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(lib.get(names[0]).path))
    sds = [load_file(str(lib.get(n).path / "adapter_model.safetensors")) for n in names]
    merged = {k: sum(w * sd[k] for w, sd in zip(weights, sds)) for k in sds[0]}
    set_peft_model_state_dict(peft_model, merged)
    return peft_model.eval()


def test_params_mixture_and_composed_factors_match_reference_logits(
    ref_batch, tiny_model, model, tiny_tokenizer, make_library, shots
):
    lib = make_library(4)
    ids, mask, _ = ref_batch(tiny_tokenizer, shots)
    with torch.no_grad():
        want = reference_model(tiny_model, lib, WEIGHTS)(input_ids=ids, attention_mask=mask).logits
        base = tiny_model(input_ids=ids, attention_mask=mask).logits
        experts = resolve_experts(lib, None, torch.device("cpu"))
        with attach(model, experts, weights=WEIGHTS, mix="params"):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        factors = composed_factors(experts, WEIGHTS, "params")
        with attach(model, [("composed", factors)], weights=[1.0]):
            composed = model(input_ids=ids, attention_mask=mask).logits
    assert (want - base).abs().max() > 0.1  # the composition changes the model
    torch.testing.assert_close(mixed, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(composed, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("loss, divide", [("reference", True), ("token", False)])
def test_scorer_loss_is_the_reference_loss(
    ref_batch, tiny_model, model, tiny_tokenizer, make_library, shots, loss, divide
):
    lib = make_library(4)
    ids, mask, labels = ref_batch(tiny_tokenizer, shots)
    with torch.no_grad():
        ref = reference_model(tiny_model, lib, WEIGHTS)
        hf_loss = float(ref(input_ids=ids, attention_mask=mask, labels=labels).loss)
    want = hf_loss / len(shots) if divide else hf_loss  # default_get_loss: / len(examples)
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    with PopulationScorer(model, experts, batch, mix="params", loss=loss) as scorer:
        got = float(scorer.losses(torch.tensor([WEIGHTS]))[0])
    assert got == pytest.approx(want, rel=1e-5)


def test_example_loss_averages_each_shot(
    ref_batch, tiny_model, model, tiny_tokenizer, make_library, shots
):
    lib = make_library(3)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    w = WEIGHTS[:3]
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    with PopulationScorer(model, experts, batch, loss="example") as scorer:
        got = float(scorer.losses(torch.tensor([w]))[0])
    ref = reference_model(tiny_model, lib, w)
    per_shot = []
    with torch.no_grad():
        for ex in shots:  # one shot at a time, no padding at all
            ids, mask, labels = ref_batch(tiny_tokenizer, [ex])
            per_shot.append(float(ref(input_ids=ids, attention_mask=mask, labels=labels).loss))
    assert got == pytest.approx(sum(per_shot) / len(per_shot), rel=1e-5)


@pytest.mark.parametrize("mix", ["params", "output"])
def test_population_losses_equal_one_at_a_time(model, tiny_tokenizer, make_library, shots, mix):
    lib = make_library(4)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    population = torch.rand(7, 4, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    with PopulationScorer(model, experts, batch, mix=mix, chunk=3) as scorer:
        batched = scorer.losses(population)
        passes = scorer.passes
        single = torch.cat([scorer.losses(w[None]) for w in population])
    assert passes == 3  # 7 candidates in chunks of 3
    assert len(set(batched.tolist())) == 7
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_output_mix_is_the_dense_weighted_delta(
    ref_batch, tiny_model, model, tiny_tokenizer, make_library, shots
):
    lib = make_library(4)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    ids, mask, _ = ref_batch(tiny_tokenizer, shots)
    dense = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for module in experts[0][1]:
            delta = sum(w * fs[module].delta() for w, (_, fs) in zip(WEIGHTS, experts))
            dense.get_submodule(module).weight += delta
        want = dense(input_ids=ids, attention_mask=mask).logits
        with attach(model, experts, weights=WEIGHTS, mix="output"):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        factors = composed_factors(experts, WEIGHTS, "output")
        with attach(model, [("composed", factors)], weights=[1.0]):
            composed = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(mixed, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(composed, want, atol=2e-5, rtol=1e-4)
    assert all(f.rank == 16 for f in factors.values())  # 4 experts x rank 4, concatenated


def test_bf16_scorer_loss_is_the_reference_loss_with_float32_lora(
    ref_batch, tiny_model, tiny_tokenizer, make_library, shots
):
    """On a bf16 model PEFT keeps the adapter in float32; the scorer's default LoRA
    precision (float32) gives the reference's loss, so both searches rank alike."""
    lib = make_library(4)
    ids, mask, labels = ref_batch(tiny_tokenizer, shots)
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with torch.no_grad():
        ref = reference_model(low, lib, WEIGHTS)
        want = float(ref(input_ids=ids, attention_mask=mask, labels=labels).loss) / len(shots)
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    got = {}
    for dtype in (torch.float32, None):
        with PopulationScorer(model, experts, batch, lora_dtype=dtype) as scorer:
            got[dtype] = float(scorer.losses(torch.tensor([WEIGHTS]))[0])
    assert got[torch.float32] == pytest.approx(want, rel=1e-6)
    assert abs(got[None] - want) > abs(got[torch.float32] - want)


def test_bf16_population_losses_do_not_depend_on_the_other_candidates(
    tiny_model, tiny_tokenizer, make_library, shots
):
    """Each candidate's loss is the same bits alone or in any population (bf16 amplifies
    any shape-dependent rounding of a batched kernel into visible loss changes)."""
    lib = make_library(4)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    population = torch.rand(9, 4, generator=torch.Generator().manual_seed(2)) * 3 - 1.5
    with PopulationScorer(model, experts, batch, mix="params", chunk=4) as scorer:
        batched = scorer.losses(population)
        single = torch.cat([scorer.losses(w[None]) for w in population])
        shuffled = scorer.losses(population.flip(0)).flip(0)
    assert torch.equal(batched, single) and torch.equal(batched, shuffled)
