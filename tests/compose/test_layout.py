"""The prefix layout (the shots' common prompt prefix once per candidate, through a KV
cache) computes the padded batch's losses, and gradients, exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from lorashelf.compose import ComposeConfig, PopulationScorer, encode_shots, resolve_experts
from lorashelf.compose.layout import MIN_PREFIX, PREFIX_ALIGN, choose_layout, common_prefix
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError

POPULATION = torch.tensor([[0.7, -1.2, 0.3, 1.4], [0.0, 0.5, -0.5, 0.2], [1.5, 1.5, -1.5, 0.0]])


def losses(model, experts, batch, layout, loss="reference", weights=POPULATION):
    with PopulationScorer(model, experts, batch, layout=layout, loss=loss, chunk=2) as scorer:
        assert scorer.layout.name == layout
        return scorer.losses(weights)


@pytest.mark.parametrize("loss", ["reference", "token", "example"])
def test_prefix_layout_gives_the_padded_losses(model, tiny_tokenizer, make_library, shots, loss):
    experts = resolve_experts(make_library(4), None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    padded = losses(model, experts, batch, "padded", loss)
    prefix = losses(model, experts, batch, "prefix", loss)
    torch.testing.assert_close(prefix, padded, atol=1e-6, rtol=1e-6)
    assert len(set(padded.tolist())) == len(POPULATION)  # the candidates do differ


def test_prefix_layout_is_bit_identical_in_bf16(tiny_model, tiny_tokenizer, make_library, shots):
    """bf16 on the CPU: the suffix keeps the padded width and the prefix pass is padded
    to PREFIX_ALIGN, so sdpa sees the padded batch's key layout and rounds alike."""
    experts = resolve_experts(make_library(4), None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert torch.equal(
        losses(model, experts, batch, "prefix"), losses(model, experts, batch, "padded")
    )


def test_targets_inside_the_shared_prefix(model, tiny_tokenizer, make_library):
    """Shots with one prompt share it and part of the target: predictions from inside
    the prefix come from the prefix pass."""
    same = [Example(prompt="Q: name a colour. A:", target=t) for t in (" red", " reed", " rose")]
    batch = encode_shots(tiny_tokenizer, same, max_length=512)
    first_target = int(batch.cols.min())
    assert common_prefix(batch) > first_target
    experts = resolve_experts(make_library(4), None, torch.device("cpu"))
    torch.testing.assert_close(
        losses(model, experts, batch, "prefix"), losses(model, experts, batch, "padded"),
        atol=1e-6, rtol=1e-6,
    )  # fmt: skip


def test_prefix_layout_gives_the_padded_gradients(model, tiny_tokenizer, make_library, shots):
    experts = resolve_experts(make_library(4), None, torch.device("cpu"))
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    grads = {}
    for layout in ("padded", "prefix"):
        w = POPULATION.clone().requires_grad_(True)
        with PopulationScorer(model, experts, batch, layout=layout) as scorer:
            scorer.forward(w).sum().backward()
        grads[layout] = w.grad
    assert grads["padded"].abs().sum() > 0
    torch.testing.assert_close(grads["prefix"], grads["padded"], atol=1e-5, rtol=1e-4)


def test_layout_shapes_and_choice(tiny_tokenizer, shots):
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    n, width = batch.input_ids.shape
    p = common_prefix(batch)
    assert p >= MIN_PREFIX
    prefix = choose_layout(batch)  # auto
    assert prefix.name == "prefix" and prefix.prefix == p
    assert prefix.prefix_ids.shape[1] % PREFIX_ALIGN == 0
    assert int(prefix.prefix_mask.sum()) == p
    assert prefix.input_ids.shape == (n, width - p)
    assert prefix.tokens < choose_layout(batch, "padded").tokens == n * width
    assert torch.equal(prefix.prefix_ids[0, :p], batch.input_ids[0, :p])


def test_auto_stays_padded_without_a_shared_prefix(tiny_tokenizer):
    apart = [Example(prompt=p, target=" x") for p in ("alpha beta", "gamma", "zeta eta theta")]
    batch = encode_shots(tiny_tokenizer, apart, max_length=512)
    assert common_prefix(batch) < MIN_PREFIX
    assert choose_layout(batch).name == "padded"


def test_unknown_layout_is_refused(tiny_tokenizer, shots):
    batch = encode_shots(tiny_tokenizer, shots, max_length=512)
    with pytest.raises(LorashelfError, match="prefix, padded"):
        choose_layout(batch, "packed")
    with pytest.raises(LorashelfError, match="layout must be one of auto, prefix, padded"):
        ComposeConfig(layout="packed")
