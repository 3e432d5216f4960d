"""train_expert on the tiny model: learning, determinism, saving, restoring the base."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorashelf.errors import LorashelfError
from lorashelf.train import TrainConfig, mean_target_nll, train_expert
from lorashelf.train.lora import attached, lora_modules

IDS = torch.tensor([[5, 40, 77, 120, 33, 9], [12, 13, 14, 15, 16, 17]])


def lora_weights(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_loss_decreases_and_valid_improves(tiny_base, toy_task, tmp_path):
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, max_length=64)  # dtype auto (bf16)
    _, valid = toy_task.splits().train, toy_task.splits().valid
    before = mean_target_nll(tiny_base.model, tiny_base.tokenizer, valid, cfg)
    res = train_expert(tiny_base, [toy_task], cfg, out_dir=tmp_path / "e", progress=False)
    assert len(res.loss_curve) == res.steps == 40
    first = sum(res.loss_curve[:5]) / 5
    assert res.train_loss < 0.5 * first
    assert res.valid_loss is not None and res.valid_loss < 0.5 * before
    assert res.tokens > 0 and res.n_train == len(toy_task.splits().train)


def test_determinism(tiny_base, toy_task, fast_config, tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg = dataclasses.replace(fast_config, seed=seed, dropout=0.1)
        res = train_expert(tiny_base, [toy_task], cfg, out_dir=tmp_path / name, progress=False)
        runs[name] = (res.loss_curve, lora_weights(tmp_path / name))
    assert runs["a"][0] == runs["b"][0]
    for k, v in runs["a"][1].items():
        assert torch.equal(v, runs["b"][1][k]), k
    assert runs["a"][0] != runs["c"][0]
    assert any(not torch.equal(v, runs["c"][1][k]) for k, v in runs["a"][1].items())


def test_init_seed_shared_across_experts(tiny_base, toy_task, gen_task, fast_config, tmp_path):
    def a_of(init_seed, task, name, **kw):
        cfg = dataclasses.replace(fast_config, init_seed=init_seed, steps=1, lr=1e-7, **kw)
        train_expert(tiny_base, [task], cfg, out_dir=tmp_path / name, progress=False)
        return {k: v for k, v in lora_weights(tmp_path / name).items() if "lora_A" in k}

    one, two = a_of(0, toy_task, "one"), a_of(0, gen_task, "two", seed=5)
    other = a_of(1, toy_task, "other")
    # the same initial A for different tasks and data orders (Adam moved it ~lr only)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert min((one[k] - other[k]).abs().max().item() for k in one) > 1e-2
    # modules get their own A, and sharing holds across different target sets
    q, v = (one[k] for k in sorted(one)[:2])
    assert not torch.equal(q, v) or q.shape != v.shape
    qv = a_of(0, gen_task, "qv", target_modules=("q_proj", "v_proj"))
    assert qv.keys() < one.keys()
    assert max((one[k] - qv[k]).abs().max().item() for k in qv) < 1e-5


def test_lora_init_is_seeded_not_global(tiny_base, fast_config):
    with attached(tiny_base.model, fast_config, "x") as pm:
        torch.manual_seed(123)
        a1 = {n: m.lora_A["default"].weight.clone() for n, m in lora_modules(pm)}
        bound = max(w.abs().max().item() for w in a1.values())
        assert all(
            torch.count_nonzero(m.lora_B["default"].weight) == 0 for _, m in lora_modules(pm)
        )
    with attached(tiny_base.model, fast_config, "x") as pm:
        a2 = {n: m.lora_A["default"].weight for n, m in lora_modules(pm)}
        assert all(torch.equal(a1[n], a2[n]) for n in a1)
        assert all(w.dtype == torch.float32 for w in a2.values())
    assert "model.layers.0.self_attn.q_proj" in a1
    assert bound <= 1 / tiny_base.model.config.hidden_size**0.5


def test_base_restored(tiny_base, toy_task, fast_config, tmp_path):
    model = tiny_base.model
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules_before = [type(m) for m in model.modules()]
    attn = model.config._attn_implementation
    assert attn != "eager"  # so the switch to eager for CPU training is exercised
    with torch.no_grad():
        before = model(IDS).logits
    train_expert(tiny_base, [toy_task], fast_config, out_dir=tmp_path / "e1", progress=False)
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(before, after)
    assert [type(m) for m in model.modules()] == modules_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not model.training and not hasattr(model, "peft_config")
    assert model.config._attn_implementation == attn
    # the same loaded base trains the next expert
    train_expert(tiny_base, [toy_task], fast_config, out_dir=tmp_path / "e2", progress=False)


def test_saved_adapter_is_plain_peft(tiny_base, toy_task, fast_config, tmp_path):
    out = tmp_path / "expert"
    res = train_expert(tiny_base, [toy_task], fast_config, out_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "tiny-llama"
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8
    assert sorted(acfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert json.loads((out / "training.json").read_text())["training"]["alpha"] == 8.0

    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(out)).eval()
    # in-memory valid loss == the same loss recomputed from the saved adapter
    valid = toy_task.splits().valid
    assert mean_target_nll(loaded, tiny_base.tokenizer, valid, fast_config) == pytest.approx(
        res.valid_loss, rel=1e-6
    )
    # and the loaded model equals an independent dense merge W + (alpha/r) B @ A
    dense = copy.deepcopy(tiny_base.model)
    weights = lora_weights(out)
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace("lora_A", "lora_B")]
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            dense.get_submodule(path).weight += (8 / 4) * b @ a
        assert torch.allclose(loaded(IDS).logits, dense(IDS).logits, atol=1e-5)
        assert not torch.allclose(loaded(IDS).logits, tiny_base.model(IDS).logits, atol=1e-3)


def test_joint_training_uses_union(tiny_base, toy_task, gen_task, fast_config, tmp_path):
    res = train_expert(
        tiny_base, [toy_task, gen_task], fast_config, out_dir=tmp_path / "j", progress=False
    )
    assert res.tasks == ["toy:parity", "toy:echo"]
    assert res.n_train == len(toy_task.splits().train) + len(gen_task.splits().train)
    card = res.card()
    assert card["tasks"] == res.tasks and card["source"] == "train"
    assert card["init_seed"] == 0 and card["extra"]["loss_curve"] == res.loss_curve
    solo = train_expert(tiny_base, [toy_task], fast_config, out_dir=tmp_path / "s", progress=False)
    assert solo.data_fingerprint != res.data_fingerprint


def test_epochs_and_explicit_valid(tiny_base, toy_task, fast_config, tmp_path):
    cfg = dataclasses.replace(fast_config, steps=None, epochs=1.0)
    valid = list(toy_task.splits().test[:3])
    res = train_expert(
        tiny_base, [toy_task], cfg, out_dir=tmp_path / "e", valid=valid, progress=False
    )
    assert res.steps == -(-len(toy_task.splits().train) // cfg.batch_size)
    assert res.n_valid == 3


def test_refuses_nonempty_out_dir_and_leaves_nothing(tiny_base, toy_task, fast_config, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(LorashelfError, match="not empty"):
        train_expert(tiny_base, [toy_task], fast_config, out_dir=out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary leftovers


def test_interrupt_restores_base_and_writes_nothing(
    tiny_base, toy_task, fast_config, tmp_path, monkeypatch
):
    import lorashelf.train.trainer as trainer

    calls = {"n": 0}
    real = trainer.target_nll

    def boom(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(trainer, "target_nll", boom)
    with pytest.raises(KeyboardInterrupt):
        train_expert(tiny_base, [toy_task], fast_config, out_dir=tmp_path / "e", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert not any("lora" in n for n, _ in tiny_base.model.named_modules())


def test_bad_targets_and_empty_split(tiny_base, toy_task, fast_config, tmp_path):
    cfg = dataclasses.replace(fast_config, target_modules=("nope_proj",))
    with pytest.raises(LorashelfError, match="target-modules"):
        train_expert(tiny_base, [toy_task], cfg, out_dir=tmp_path / "e", progress=False)
    assert not any("lora" in n for n, _ in tiny_base.model.named_modules())
    tiny = dataclasses.replace(toy_task, examples=toy_task.examples[:1])
    with pytest.raises(LorashelfError, match="no examples"):
        train_expert(
            tiny_base, [tiny], fast_config.__class__(train_on="valid"), out_dir=tmp_path / "f"
        )


def test_valid_loss_scored_in_the_models_own_attention(
    tiny_base, toy_task, fast_config, tmp_path, monkeypatch
):
    # training runs eager attention on the CPU; the card's valid loss must be the
    # quantity evaluation computes, in the model's own attention (bf16 eager and sdpa
    # scored one SmolLM2 adapter 0.309 and 0.324)
    import lorashelf.train.trainer as trainer

    tiny_base.model.set_attn_implementation("sdpa")
    seen, score = [], trainer.mean_target_nll

    def spy(model, *args, **kwargs):
        seen.append(tiny_base.model.config._attn_implementation)
        return score(model, *args, **kwargs)

    steps = []

    def loop(*args):
        steps.append(tiny_base.model.config._attn_implementation)
        return [1.0], [1], [0.1]

    monkeypatch.setattr(trainer, "mean_target_nll", spy)
    monkeypatch.setattr(trainer, "_loop", loop)
    res = train_expert(tiny_base, [toy_task], fast_config, out_dir=tmp_path / "e", progress=False)
    assert steps == ["eager"] and seen == ["sdpa"] and res.valid_loss is not None
    assert tiny_base.model.config._attn_implementation == "sdpa"
