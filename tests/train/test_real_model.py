"""Integration: a few training steps of the real SmolLM2-135M (cached, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorashelf.models import load_base
from lorashelf.train import TrainConfig, mean_target_nll, train_expert

HOME = Path.home() / ".cache" / "lorashelf"
MODEL_DIR = HOME / "models" / "smollm2-135m"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason="SmolLM2 not cached"),
]


def test_smollm2_trains_restores_and_saves(toy_task, tmp_path):
    base = load_base("smollm2-135m", home=HOME, dtype=torch.bfloat16)
    task = toy_task
    cfg = TrainConfig(steps=4, batch_size=4, lr=2e-3, warmup=0.0, max_length=64)
    valid = task.splits().valid
    ids = base.tokenizer("The sun number 4 is even? Answer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base.model(ids).logits
    nll_before = mean_target_nll(base.model, base.tokenizer, valid, cfg)
    res = train_expert(base, [task], cfg, out_dir=tmp_path / "e", progress=False)
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, before)  # base restored
    assert all(torch.isfinite(torch.tensor(res.loss_curve)))
    assert res.loss_curve[-1] < res.loss_curve[0]
    assert res.valid_loss < nll_before
    acfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sorted(acfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
