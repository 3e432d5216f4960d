"""Bad input gives one clear LorashelfError, and a failed save leaves the library as it was."""

from __future__ import annotations

import os

import pytest
import torch

from lorashelf.compose import ComposeConfig, compose, resolve_experts, save_composition
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors


def snapshot(lib):
    """Everything on disk under the library (paths and sizes) plus its expert names."""
    files = sorted(
        (os.path.relpath(os.path.join(d, f), lib.path), os.path.getsize(os.path.join(d, f)))
        for d, _, fs in os.walk(lib.path)
        for f in fs
        if not f.startswith("index.sqlite")
    )
    return lib.names(), files


def test_zero_examples(model, tiny_tokenizer, make_library):
    with pytest.raises(LorashelfError, match="no examples to compose from"):
        compose(model, tiny_tokenizer, make_library(2), [], ComposeConfig(budget=2))


def test_example_longer_than_the_context(model, tiny_tokenizer, make_library, shots):
    long = Example(prompt="x" * 600, target=" y")  # the tiny model reads 512 positions
    with pytest.raises(LorashelfError, match=r"shot 5 is 603 tokens long .* at most 512"):
        compose(model, tiny_tokenizer, make_library(2), [*shots, long], ComposeConfig(budget=2))


def test_all_zero_weights_are_not_saved(model, tiny_tokenizer, make_library, shots):
    lib = make_library(3)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(optimizer="ngopt", budget=1))
    assert res.weights == [0.0, 0.0, 0.0]  # nevergrad starts at w = 0
    before = snapshot(lib)
    with pytest.raises(LorashelfError, match="weights are all zero"):
        save_composition(res, lib, "zero")
    assert snapshot(lib) == before


def test_mixed_ranks_need_output_mixing(model, tiny_tokenizer, shots):
    g = torch.Generator().manual_seed(0)
    m = "model.layers.0.self_attn.q_proj"

    def expert(r):
        return {
            m: LoraFactors(torch.randn(r, 64, generator=g), torch.randn(64, r, generator=g), 1.0)
        }

    experts = [("a", expert(4)), ("b", expert(8))]
    with pytest.raises(LorashelfError, match=r"different ranks .*mix='output'"):
        compose(model, tiny_tokenizer, experts, shots, ComposeConfig(budget=2))
    res = compose(model, tiny_tokenizer, experts, shots, ComposeConfig(budget=2, mix="output"))
    assert res.factors[m].rank == 12


def test_failed_add_writes_nothing(model, tiny_tokenizer, make_library, shots):
    lib = make_library(2)
    res = compose(model, tiny_tokenizer, lib, shots, ComposeConfig(budget=4, popsize=4))
    before = snapshot(lib)
    for name, match in [("e0", "already exists"), ("bad/name", "not a safe directory name")]:
        with pytest.raises(LorashelfError, match=match):
            save_composition(res, lib, name)
        assert snapshot(lib) == before
    res_exact = compose(model, tiny_tokenizer, lib, shots,
                        ComposeConfig(budget=2, mix="output", save_rank=0))  # fmt: skip
    with pytest.raises(LorashelfError, match="rank"):  # rank 8 in a rank-4 library
        save_composition(res_exact, lib, "hub")
    assert snapshot(lib) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "cmaes"}, "unknown optimizer 'cmaes'.*did you mean: cma"),
        ({"experts": ("e0", "e9")}, "no expert 'e9'"),
        ({"preselect": 1, "preselect_by": "arow"}, "unknown preselector 'arow'"),
    ],
)
def test_bad_names(model, tiny_tokenizer, make_library, shots, kwargs, match):
    with pytest.raises(LorashelfError, match=match):
        compose(model, tiny_tokenizer, make_library(2), shots, ComposeConfig(budget=2, **kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bounds": (1.0, -1.0)}, "low < high"),
        ({"budget": 0}, "budget must be >= 1"),
        ({"mix": "both"}, "mix must be one of params, output"),
        ({"loss": "mean"}, "loss must be one of"),
        ({"experts": ()}, "experts is empty"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(LorashelfError, match=match):
        ComposeConfig(**kwargs)


def test_experts_as_pairs_and_subset(model, tiny_tokenizer, make_library, shots):
    lib = make_library(3)
    pairs = resolve_experts(lib, None, torch.device("cpu"))
    res = compose(
        model, tiny_tokenizer, pairs, shots, ComposeConfig(budget=2, experts=("e2", "e0"))
    )
    assert res.experts == ["e2", "e0"]
