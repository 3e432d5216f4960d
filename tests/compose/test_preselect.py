"""Preselection keeps the experts that look best on the shots."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from lorashelf.compose import PRESELECTORS, ComposeConfig, compose
from lorashelf.errors import LorashelfError


def hf_loss(tiny_model, tok, path, shots, ref_batch):
    """The shots' pooled target loss under one expert, through PEFT (independent)."""
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(path)).eval()
    ids, mask, labels = ref_batch(tok, shots)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_registry_holds_loss_and_arrow():
    """Both preselectors the docs name are registered; a typo names the close one."""
    assert "loss" in PRESELECTORS and "arrow" in PRESELECTORS
    assert PRESELECTORS.get("loss") is not PRESELECTORS.get("arrow")
    with pytest.raises(LorashelfError, match="did you mean: loss"):
        PRESELECTORS.get("los")


def test_loss_preselection_keeps_the_lowest_losses(
    ref_batch, tiny_model, model, tiny_tokenizer, fitted_library, shots
):
    lib = fitted_library
    cfg = ComposeConfig(preselect=2, preselect_by="loss", budget=4, loss="token")
    res = compose(model, tiny_tokenizer, lib, shots, cfg)
    want = {
        n: hf_loss(tiny_model, tiny_tokenizer, lib.get(n).path, shots, ref_batch)
        for n in lib.names()
    }
    assert res.preselection == pytest.approx({n: -v for n, v in want.items()}, rel=1e-5)
    best_two = sorted(want, key=want.get)[:2]
    assert "fit" in best_two
    assert sorted(res.experts) == sorted(best_two)
    assert len(res.weights) == 2


def test_arrow_preselection_keeps_the_most_routed(model, tiny_tokenizer, make_library, shots):
    lib = make_library(5)
    res = compose(model, tiny_tokenizer, lib, shots,
                  ComposeConfig(preselect=3, preselect_by="arrow", budget=4))  # fmt: skip
    scores = res.preselection
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)  # a softmax over top-4 per token
    assert sorted(res.experts) == sorted(sorted(scores, key=scores.get, reverse=True)[:3])


def test_preselect_larger_than_the_library_keeps_all(model, tiny_tokenizer, make_library, shots):
    res = compose(model, tiny_tokenizer, make_library(2), shots,
                  ComposeConfig(preselect=5, budget=2))  # fmt: skip
    assert res.experts == ["e0", "e1"] and res.preselection is None
