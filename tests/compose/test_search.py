"""The search: deterministic per seed, private random state, finds the right expert."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lorashelf.compose import (
    ComposeConfig,
    PopulationScorer,
    compose,
    encode_shots,
    resolve_experts,
)


def first_logits(model, tok):
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("optimizer", ["cma", "ngopt", "adam"])
def test_same_seed_same_trace_and_model_restored(
    model, tiny_tokenizer, make_library, shots, optimizer
):
    lib = make_library(4)
    before = first_logits(model, tiny_tokenizer)
    cfg = ComposeConfig(optimizer=optimizer, budget=14, popsize=5 if optimizer != "adam" else None)
    a = compose(model, tiny_tokenizer, lib, shots, cfg)
    b = compose(model, tiny_tokenizer, lib, shots, cfg)
    assert [t["loss"] for t in a.trace] == [t["loss"] for t in b.trace]
    assert [t["weights"] for t in a.trace] == [t["weights"] for t in b.trace]
    assert a.weights == b.weights and a.loss == b.loss
    assert len(a.trace) == (15 if optimizer == "adam" else 14)
    torch.testing.assert_close(first_logits(model, tiny_tokenizer), before, atol=0, rtol=0)
    if optimizer != "adam":  # (adam starts from 1/E for every seed)
        c = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(**{**cfg.__dict__, "seed": 1}))
        assert [t["weights"] for t in c.trace] != [t["weights"] for t in a.trace]


def test_cma_asks_whole_generations_and_scores_each_in_one_pass(
    model, tiny_tokenizer, make_library, shots
):
    lib = make_library(4)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(budget=20, popsize=6, chunk=16))
    gens = [t["generation"] for t in res.trace]
    assert gens == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2  # the last generation is cut to budget
    assert res.passes == 4
    best = min(res.trace, key=lambda t: t["loss"])
    assert res.weights == best["weights"] and res.loss == best["loss"]
    for t in res.trace:  # the objective is ce + 0.05 * mean|w|, inside the bounds
        assert t["loss"] == pytest.approx(t["ce"] + 0.05 * np.abs(t["weights"]).mean())
        assert max(abs(w) for w in t["weights"]) <= 1.5


def test_ngopt_is_sequential_by_default_and_starts_at_zero(
    model, tiny_tokenizer, make_library, shots
):
    lib = make_library(3)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(optimizer="ngopt", budget=6))
    assert res.passes >= 6  # one candidate per pass, as the reference scores them
    assert res.trace[0]["weights"] == [0.0, 0.0, 0.0]


def test_caller_random_state_is_untouched(model, tiny_tokenizer, make_library, shots):
    lib = make_library(3)
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    for opt in ("cma", "ngopt"):
        compose(model, tiny_tokenizer, lib, shots, ComposeConfig(optimizer=opt, budget=8))
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


@pytest.mark.parametrize("optimizer", ["cma", "ngopt", "adam"])
def test_search_finds_the_expert_fitted_to_the_shots(
    model, tiny_tokenizer, fitted_library, shots, optimizer
):
    """Among random experts, one was trained on the shots: the search must weigh it most
    and get at least half the way from the base model's loss to that expert's own."""
    lib = fitted_library
    experts = resolve_experts(lib, None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    with PopulationScorer(model, experts, batch) as scorer:
        at_zero, fit_alone = scorer.losses(torch.tensor([[0.0] * 4, [0, 0, 0, 1.0]])).tolist()
    fit_alone += 0.05 * 0.25
    assert fit_alone < at_zero - 0.1
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(optimizer=optimizer, lr=0.1))
    assert res.loss < at_zero - 0.5 * (at_zero - fit_alone), (res.loss, at_zero, fit_alone)
    w = dict(zip(res.experts, np.abs(res.weights)))
    assert max(w, key=w.get) == "fit", res.weight_map
