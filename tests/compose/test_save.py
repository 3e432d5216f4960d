"""A composition saved into the library is a standard PEFT adapter with a full card."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from lorashelf.compose import ComposeConfig, compose, save_composition
from lorashelf.lora import attach


def logits_of(model, tok, text="the quick brown fox"):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(tiny_model, tok, path):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(path)).eval()
    return logits_of(peft_model, tok)


def test_params_composition_round_trips_through_peft(
    tiny_model, model, tiny_tokenizer, make_library, shots
):
    lib = make_library(4)
    cfg = ComposeConfig(budget=12, popsize=6)
    res = compose(model, tiny_tokenizer, lib, shots, cfg)
    with attach(model, lib_experts(lib), weights=res.weights, mix="params"):
        want = logits_of(model, tiny_tokenizer)
    expert = save_composition(res, lib, "hub", tasks=["toy:new"])
    assert "hub" in lib.names()
    torch.testing.assert_close(peft_logits(tiny_model, tiny_tokenizer, expert.path), want,
                               atol=2e-5, rtol=1e-4)  # fmt: skip
    card = lib.get("hub").card
    assert card["source"] == "compose" and card["tasks"] == ["toy:new"]
    extra = card["extra"]
    assert res.experts == ["e0", "e1", "e2", "e3"]
    assert extra["weights"] == dict(zip(res.experts, res.weights))
    assert extra["examples_fingerprint"] == res.examples_fingerprint == card["data_fingerprint"]
    assert extra["config"]["budget"] == 12 and extra["config"]["mix"] == "params"
    assert len(extra["trace"]) == 12 and extra["loss"] == res.loss
    assert extra["rank"] == 4 and extra["relative_truncation_error"] == 0.0
    assert card["origin"]["experts"] == res.experts
    assert json.loads((expert.path / "adapter_config.json").read_text())["r"] == 4


def lib_experts(lib):
    from lorashelf.compose import resolve_experts

    return resolve_experts(lib, None, torch.device("cpu"))


@pytest.mark.parametrize("save_rank, exact", [(0, True), (None, False)])
def test_output_composition_exact_or_truncated(
    tiny_model, model, tiny_tokenizer, make_library, shots, save_rank, exact
):
    lib = make_library(3)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(mix="output", budget=6))
    with attach(model, lib_experts(lib), weights=res.weights, mix="output"):
        want = logits_of(model, tiny_tokenizer)
    expert = save_composition(res, lib, "hub-out", rank=save_rank, allow_mixed=exact)
    got = peft_logits(tiny_model, tiny_tokenizer, expert.path)
    extra = expert.card["extra"]
    if exact:
        assert extra["rank"] == 12 and extra["relative_truncation_error"] == 0.0
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    else:  # cut to the experts' rank 4 by SVD: close to, but not exactly, the composition
        assert extra["rank"] == 4 and extra["truncated_to"] == 4
        assert 0.0 < extra["relative_truncation_error"] < 1.0
        assert (got - want).abs().max() > 1e-6
        base = logits_of(tiny_model, tiny_tokenizer)
        assert (got - want).norm() < (base - want).norm()


def test_truncation_error_is_the_frobenius_error(make_library, model, tiny_tokenizer, shots):
    from lorashelf.lora.peft import truncate_all

    lib = make_library(3)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(mix="output", budget=4))
    cut, err = truncate_all(res.factors, 2)
    num = sum((f.delta() - cut[m].delta()).norm() ** 2 for m, f in res.factors.items())
    den = sum(f.delta().norm() ** 2 for f in res.factors.values())
    assert err == pytest.approx(float((num / den) ** 0.5), rel=1e-4)
    assert all(f.rank == 2 for f in cut.values())


def test_modules_of_different_ranks_use_rank_pattern(
    tmp_path, tiny_model, tiny_model_dir, model, tiny_tokenizer, shots, make_adapter
):
    """Experts adapting different modules: the exact output composition has rank 8 where
    both act and 4 where one does; PEFT reads that back through rank_pattern."""
    from lorashelf.library import Library, read_lora_factors

    a = read_lora_factors(make_adapter("a", 1))
    b = read_lora_factors(make_adapter("b", 2, target_modules=["q_proj"]))
    experts = [("a", a), ("b", b)]
    res = compose(model, tiny_tokenizer, experts, shots,
                  ComposeConfig(mix="output", budget=4, save_rank=0))  # fmt: skip
    with attach(model, experts, weights=res.weights, mix="output"):
        want = logits_of(model, tiny_tokenizer)
    lib = Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir),
                       allow_mixed=True)  # fmt: skip
    expert = save_composition(res, lib, "mixed")
    cfg = json.loads((expert.path / "adapter_config.json").read_text())
    assert cfg["r"] in (4, 8) and cfg["rank_pattern"]
    got = peft_logits(tiny_model, tiny_tokenizer, expert.path)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
