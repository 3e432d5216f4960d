"""Retrieval routing: the top-k choice against a hand computation, k=1 equals the chosen
expert alone (forward, the shared-prompt scorer and generation), Arrow only among the
retrieved, the embedding cache (reused for unchanged experts, computed for new ones),
and that detaching removes the hooks."""

from __future__ import annotations

import json

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.evaluate.scoring import score_continuations
from lorashelf.lora import attach
from lorashelf.route import build_routed_model
from lorashelf.route.retrieval import EXTRAS_KEY, RetrievalConfig
from lorashelf.route.retrieval_store import CACHE_FILE, read_embeddings


def hand_choice(model, ids, mask, embs: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's top-k experts, written out: base last hidden states averaged over the
    real tokens, centred by the experts' mean, cosine, sorted."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    center = embs.double().mean(0)
    out = []
    for h, m in zip(hidden, mask):
        q = h[m.bool()].mean(0) - center
        cos = [float(q @ (e - center) / (q.norm() * (e - center).norm())) for e in embs.double()]
        out.append(sorted(range(len(cos)), key=lambda e: -cos[e])[:k])
    return out


@pytest.fixture
def embs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, model.config.hidden_size, generator=g)


def padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return mask


@pytest.mark.parametrize("weighting", ["uniform", "softmax"])
def test_top_k_choice_equals_hand_computation(model, experts, ids, embs, weighting):
    mask = padded(ids)
    want = hand_choice(model, ids, mask, embs, k=2)
    config = RetrievalConfig(top_k=2, weighting=weighting, temperature=0.5)
    extras = {EXTRAS_KEY: embs}
    with build_routed_model(model, experts, "retrieval", config, extras=extras) as routed:
        with torch.no_grad():
            routed(input_ids=ids, attention_mask=mask)
        state = next(iter(routed.routers.values())).state
        w = state.weights
    assert [sorted(torch.nonzero(row).flatten().tolist()) for row in w] == [sorted(c) for c in want]
    assert torch.allclose(w.sum(-1), torch.ones(len(ids)))
    if weighting == "uniform":
        assert set(w[w > 0].tolist()) == {0.5}
    else:  # the closer expert weighs more
        for row, chosen in zip(w, want):
            assert row[chosen[0]] >= row[chosen[1]]


def test_k1_equals_the_chosen_expert_alone(model, experts, ids, embs, tiny_tokenizer):
    mask = padded(ids)
    chosen = [c[0] for c in hand_choice(model, ids, mask, embs, k=1)]
    assert len(set(chosen)) > 1  # the rows pick different experts
    pairs = [("Q: the sum of 3 and 4?\nA:", " seven"), ("Q: the sum of 3 and 4?\nA:", " 7"),
             ("Hello there, who", " are you")]  # fmt: skip
    config = RetrievalConfig(top_k=1)
    with build_routed_model(model, experts, "retrieval", config, extras={EXTRAS_KEY: embs}) as r:
        with torch.no_grad():
            got = r(input_ids=ids, attention_mask=mask).logits
            scored = score_continuations(model, tiny_tokenizer, pairs)
            prompt_ids = torch.tensor([tiny_tokenizer("Hello there, who")["input_ids"]])
            gen = model.generate(prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, e in enumerate(chosen):
        with attach(model, [experts[e]], weights=[1.0]), torch.no_grad():
            alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    for (prompt, cont), s in zip(pairs, scored):  # the scorer runs the prompt, then continues
        p_ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        e = hand_choice(model, p_ids, torch.ones_like(p_ids), embs, k=1)[0][0]
        with attach(model, [experts[e]], weights=[1.0]):
            (ref,) = score_continuations(model, tiny_tokenizer, [(prompt, cont)], fast=False)
        assert s.logprob == pytest.approx(ref.logprob, abs=1e-4)
    e = hand_choice(model, prompt_ids, torch.ones_like(prompt_ids), embs, k=1)[0][0]
    with attach(model, [experts[e]], weights=[1.0]), torch.no_grad():
        ref_gen = model.generate(prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)


def test_then_arrow_routes_among_the_retrieved_only(model, experts, ids, embs):
    mask = padded(ids)
    retrieved = hand_choice(model, ids, mask, embs, k=2)
    config = RetrievalConfig(top_k=2, then_arrow=True, arrow_top_k=1)
    seen = []
    with build_routed_model(model, experts, "retrieval", config, extras={EXTRAS_KEY: embs}) as r:
        router = r.routers["model.layers.1.self_attn.q_proj"]
        router.register_forward_hook(lambda mod, args, out: seen.append(out))
        with torch.no_grad():
            r(input_ids=ids, attention_mask=mask)
    w = seen[-1]  # the routed pass (the first call is the hook's base pass: zeros)
    assert seen[0].abs().sum() == 0
    for row, chosen in enumerate(retrieved):
        picked = w[row].argmax(-1).unique().tolist()
        assert set(picked) <= set(chosen)
        assert torch.allclose(w[row].sum(-1), torch.ones(ids.shape[1]))
    assert len(w[0].argmax(-1).unique()) >= 1


def test_detach_removes_the_hooks(model, experts, ids, embs):
    with torch.no_grad():
        before = model(input_ids=ids).logits
    routed = build_routed_model(model, experts, "retrieval", extras={EXTRAS_KEY: embs})
    with torch.no_grad():
        during = model(input_ids=ids).logits
    routed.detach()
    assert not (during - before).abs().max() < 1e-6
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def _jsonl(path, prefix: str) -> str:
    rows = [{"input": f"{prefix} number {i} says", "target": " ok"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def test_cache_reused_for_unchanged_and_computed_for_new(
    tmp_path, tiny_library, tiny_model, tiny_tokenizer, kit, monkeypatch
):
    import copy

    from lorashelf import models
    from lorashelf.methods import MethodContext, prepare

    tasks = {n: [_jsonl(tmp_path / f"{n}.jsonl", n * 3)] for n in ("alpha", "beta", "gamma")}
    lib = tiny_library({"alpha": tasks["alpha"], "beta": tasks["beta"]})
    embedded: list[str] = []
    real = models.embed.mean_pooled

    def counting(model, tokenizer, texts, **kw):
        embedded.extend(texts)
        return real(model, tokenizer, texts, **kw)

    monkeypatch.setattr(models.embed, "mean_pooled", counting)
    ctx = MethodContext(lib, tokenizer=tiny_tokenizer, home=tmp_path)
    settings = {"top_k": 1, "n_prompts": 4}
    prepare("retrieval", copy.deepcopy(tiny_model), ctx, settings).close()
    assert len(embedded) == 8 and {t.split()[0] for t in embedded} == {"alpha" * 3, "beta" * 3}
    cache = lib.path / "cache" / CACHE_FILE
    first = read_embeddings(cache, _keys(cache))
    sums = [lib.get(n).files["adapter_model.safetensors"] for n in ("alpha", "beta")]
    assert sorted(k.split("/")[0] for k in first) == sorted(sums)

    embedded.clear()
    prepare("retrieval", copy.deepcopy(tiny_model), ctx, settings).close()
    assert embedded == []  # nothing new: every embedding read from the cache

    src = kit.write_adapter(tiny_model, tmp_path / "src-gamma", seed=9, base_id=lib.base_model)
    lib.add(src, name="gamma", card={"tasks": tasks["gamma"], "source": "train"})
    prepare("retrieval", copy.deepcopy(tiny_model), ctx, settings).close()
    assert len(embedded) == 4 and {t.split()[0] for t in embedded} == {"gamma" * 3}
    second = read_embeddings(cache, _keys(cache))
    assert len(second) == 3
    for k, v in first.items():  # the old entries are kept as they were
        assert torch.equal(second[k], v)


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_errors_name_the_fix(model, experts, tiny_library):
    with pytest.raises(LorashelfError, match="library_dir"):
        build_routed_model(model, experts, "retrieval")
    with pytest.raises(LorashelfError, match="weighting"):
        RetrievalConfig(weighting="max")


def test_cli_eval_retrieval(tmp_path, tiny_library):
    from lorashelf.cli import main

    tasks = {n: [_jsonl(tmp_path / f"{n}.jsonl", n)] for n in ("alpha", "beta")}
    lib = tiny_library(tasks)
    jl = tmp_path / "new.jsonl"
    jl.write_text("".join(json.dumps({"input": f"Q{i}:", "options": [" a", " b"], "answer": i % 2})
                          + "\n" for i in range(6)))  # fmt: skip
    out = tmp_path / "res.json"
    argv = ["--home", str(tmp_path), "eval", str(lib.path), "--dtype", "fp32", "--tasks",
            f"jsonl:{jl}", "--split", "all", "--method", "retrieval", "--top-k", "1",
            "--set", "n_prompts=3", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(out.read_text())["tasks"][f"jsonl:{jl}"]["n"] == 6
    assert (lib.path / "cache" / CACHE_FILE).exists()
