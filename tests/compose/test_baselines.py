"""Contract of the few-shot methods: each builds a model, changes what it should, and
``close()`` gives the base model back bit for bit; the runner's report adds up."""

from __future__ import annotations

import pytest
import torch

from lorashelf.compose import ComposeConfig, resolve_experts
from lorashelf.compose.baselines import (
    FewShotContext,
    FewShotOptions,
    icl_task,
)
from lorashelf.compose.fewshot import FewShotConfig, run_fewshot, summarise
from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError
from lorashelf.lora import attach
from lorashelf.merge import MERGES
from lorashelf.methods import fewshot_methods
from lorashelf.models import BaseModel

FEWSHOT_METHODS = fewshot_methods()


def logits_of(model, tok):
    ids = torch.tensor([tok("Q: what is 7 plus 7? A:")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ctx(model, tiny_tokenizer, make_library, shots):
    lib = make_library(3)
    base = BaseModel(model, tiny_tokenizer, name="tiny", base_id="tiny", path="tiny")
    experts = resolve_experts(lib, None, torch.device("cpu"))
    task = Task(id="toy:sum", examples=tuple(shots) * 4, kind="gen")
    cfg = ComposeConfig(budget=6, popsize=3)
    return FewShotContext(
        base, experts, task, tuple(shots[:3]), 0, cfg, FewShotOptions(lora_steps=3)
    )


def test_table_holds_the_comparisons_and_every_merge():
    from lorashelf.compose.fewshot import DEFAULT_METHODS, all_methods

    assert set(DEFAULT_METHODS) <= set(FEWSHOT_METHODS.names())
    assert set(MERGES.names()) <= set(FEWSHOT_METHODS.names())
    assert all_methods(FEWSHOT_METHODS)[: len(DEFAULT_METHODS)] == DEFAULT_METHODS
    # methods that ignore the shots run once per task, the others once per seed
    for name in MERGES.names():
        assert not FEWSHOT_METHODS.get(name).seeded
    assert not FEWSHOT_METHODS.get("zero-shot").seeded and FEWSHOT_METHODS.get("lorahub").seeded
    with pytest.raises(LorashelfError, match="did you mean: lorahub"):
        FEWSHOT_METHODS.get("lorahb")


@pytest.mark.parametrize("name", FEWSHOT_METHODS.names())
def test_method_builds_and_restores(ctx, name):
    model, tok = ctx.base.model, ctx.base.tokenizer
    before = logits_of(model, tok)
    built = FEWSHOT_METHODS.get(name).build(ctx)
    try:
        during = logits_of(built.model, tok)
    finally:
        built.close()
    torch.testing.assert_close(logits_of(model, tok), before, atol=0, rtol=0)
    changes_model = name not in ("zero-shot", "icl")  # every merge changes it
    assert bool((during - before).abs().max() > 1e-6) == changes_model
    assert (built.task is ctx.task) == (name != "icl")


def test_uniform_is_the_mixture_at_one_over_e(ctx):
    built = FEWSHOT_METHODS.get("uniform").build(ctx)
    try:
        merged = logits_of(ctx.base.model, ctx.base.tokenizer)
    finally:
        built.close()
    with attach(ctx.base.model, ctx.experts, weights=[1 / 3] * 3, mix="params"):
        mixed = logits_of(ctx.base.model, ctx.base.tokenizer)
    torch.testing.assert_close(merged, mixed, atol=1e-5, rtol=1e-4)


def test_icl_puts_the_shots_before_every_prompt():
    shots = [Example(prompt="2+2=", target="4"), Example(prompt="3+3=", target="6")]
    task = Task(id="toy:add", examples=(Example(prompt="5+5=", target="10"),), kind="gen")
    assert icl_task(task, shots).examples[0].prompt == "2+2=4\n\n3+3=6\n\n5+5="


def test_runner_report_counts_seeds_and_summarises(ctx):
    calls = []

    def evaluate(model, tok, task):
        calls.append(task.id)
        acc = 0.5 if task.examples[0].prompt.startswith("Q") else 0.25  # icl prompts differ
        return {"n": 2, "accuracy": acc, "nll": 1.0 + len(calls)}

    fs = FewShotConfig(shots=2, seeds=3, methods=("zero-shot", "icl"))
    report = run_fewshot(ctx.base, ctx.experts, [ctx.task], ctx.compose, fs, evaluate,
                         progress=False)  # fmt: skip
    per = report["tasks"]["toy:sum"]
    assert len(per["zero-shot"]["runs"]) == 1 and len(per["icl"]["runs"]) == 3
    assert per["icl"]["mean_nll"] == pytest.approx(4.0) and per["icl"]["best_nll"] == 3.0
    assert report["mean"]["zero-shot"]["mean_accuracy"] == 0.5
    assert len({r["shots"] for r in per["icl"]["runs"]}) == 3  # each seed its own shots
    for r in per["icl"]["runs"]:  # building (the prompt) is part of, and less than, the run
        assert 0 <= r["build_seconds"] <= r["seconds"]
    assert "build_seconds" in report["mean"]["icl"]


def test_summarise_mean_and_best():
    s = summarise([{"accuracy": 0.2, "nll": 3.0}, {"accuracy": 0.6, "nll": 2.0}])
    assert s["mean_accuracy"] == pytest.approx(0.4) and s["best_accuracy"] == 0.6
    assert s["mean_nll"] == pytest.approx(2.5) and s["best_nll"] == 2.0


def test_unknown_method_is_refused():
    with pytest.raises(LorashelfError, match="did you mean: lorahub"):
        FEWSHOT_METHODS.get("lorahb")
