"""CAT (per-module few-shot weights): with the modules' weights tied it is the gradient
baseline step for step; untied, its loss on the shots after the same steps is no higher;
the composed result is each module's experts combined with its own row."""

from __future__ import annotations

import torch

from lorashelf.compose import ComposeConfig, resolve_experts
from lorashelf.compose.cat import cat_compose, per_module_factors
from lorashelf.compose.lorahub import compose
from lorashelf.lora import attach

STEPS = 8


def _setup(model, make_library, mix="output"):
    lib = make_library(3)
    experts = resolve_experts(lib, None, torch.device("cpu"))
    cfg = ComposeConfig(optimizer="adam", budget=STEPS, lr=0.2, mix=mix)
    return experts, cfg


def test_tied_cat_reproduces_the_gradient_trajectory(model, tiny_tokenizer, make_library, shots):
    experts, _ = _setup(model, make_library)
    for mix in ("output", "params"):
        cfg = ComposeConfig(optimizer="adam", budget=STEPS, lr=0.2, mix=mix)
        grad = compose(model, tiny_tokenizer, experts, shots, cfg)
        tied = cat_compose(model, tiny_tokenizer, experts, shots, cfg, tied=True)
        want = [t["loss"] for t in grad.trace]
        got = [t["loss"] for t in tied["trace"]]
        assert len(got) == len(want) == STEPS + 1
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
        assert want[-1] < want[0] - 1e-3  # the steps do move the loss
        for row in tied["weights"].values():  # one shared row = the gradient's weights
            torch.testing.assert_close(torch.tensor(row).double(), torch.tensor(grad.weights).double(),
                                       atol=1e-5, rtol=1e-4)  # fmt: skip


def test_cat_loss_is_at_most_gradients(model, tiny_tokenizer, make_library, shots):
    experts, cfg = _setup(model, make_library)
    grad = compose(model, tiny_tokenizer, experts, shots, cfg)
    res = cat_compose(model, tiny_tokenizer, experts, shots, cfg)
    assert res["loss"] <= grad.loss + 1e-6
    rows = list(res["weights"].values())
    assert len(rows) == len(experts[0][1]) and len({tuple(r) for r in rows}) > 1  # per module


def test_composed_factors_are_each_modules_own_mixture(model, tiny_tokenizer, make_library, shots):
    experts, cfg = _setup(model, make_library)
    res = cat_compose(model, tiny_tokenizer, experts, shots, cfg)
    ids = torch.tensor([tiny_tokenizer("Q: 2 plus 2? A:")["input_ids"]])
    with attach(model, [("cat", res["factors"])], weights=[1.0]), torch.no_grad():
        got = model(input_ids=ids).logits
    # dense reference: each module's delta is sum_e W[m, e] s_e B_e A_e
    for m, f in res["factors"].items():
        dense = sum(
            w * fs[m].scale * fs[m].B.double() @ fs[m].A.double()
            for w, (_, fs) in zip(res["weights"][m], experts)
        )
        torch.testing.assert_close(f.scale * f.B.double() @ f.A.double(), dense, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    again = per_module_factors(experts, res["weights"], "output")
    with attach(model, [("cat", again)], weights=[1.0]), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, got)
