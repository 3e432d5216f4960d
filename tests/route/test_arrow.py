"""Arrow routing, the routed model, routing statistics and the routing report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from lorashelf.errors import LorashelfError
from lorashelf.models.lm import unwrap_lm
from lorashelf.route import (
    ROUTERS,
    ArrowConfig,
    ArrowRouter,
    RouterContext,
    attach,
    build_routed_model,
    save_routing_report,
)
from lorashelf.route.prototypes import CACHE_FILE, arrow_prototypes
from lorashelf.route.stats import recording


def test_router_rule() -> None:
    protos = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    router = ArrowRouter(protos, top_k=2, temperature=0.5)
    x = torch.randn(3, 4, 16)
    w = router(x)
    assert w.shape == (3, 4, 5)
    assert torch.equal((w > 0).sum(-1), torch.full((3, 4), 2))
    sim = (x @ protos.T).abs()
    top, idx = sim.topk(2, dim=-1)
    want = torch.zeros_like(sim).scatter(-1, idx, (top / 0.5).softmax(-1))
    torch.testing.assert_close(w, want)
    # sign-agnostic: flipping a prototype changes nothing
    flipped = ArrowRouter(protos * torch.tensor([-1.0, 1, -1, 1, 1])[:, None], 2, 0.5)
    torch.testing.assert_close(flipped(x), w)


def test_config_validation_clamp_and_empty(model, experts) -> None:
    for bad in (dict(top_k=0), dict(temperature=0.0), dict(mix="sum")):
        with pytest.raises(LorashelfError):
            ArrowConfig(**bad)
    with pytest.warns(UserWarning, match="top_k=9 exceeds the 4 experts"):
        routed = build_routed_model(model, experts, "arrow", ArrowConfig(top_k=9))
    assert all(r.top_k == 4 for r in routed.routers.values())
    routed.detach()
    with pytest.raises(LorashelfError, match="no experts"):
        build_routed_model(model, [], "arrow")
    with pytest.raises(LorashelfError, match="did you mean"):
        build_routed_model(model, experts, "arow")
    with pytest.raises(LorashelfError, match="ArrowConfig"):
        build_routed_model(model, experts, "arrow", config={"top_k": 2})


def test_single_expert_routes_everything_to_it(kit, model, shapes, ids, tmp_path) -> None:
    factors = kit.random_factors(shapes, seed=11)
    path = kit.write_adapter(model, tmp_path / "a", factors, lora_alpha=8)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    with (
        torch.no_grad(),
        build_routed_model(
            model, [("a", kit.read_lora_factors(path))], config=ArrowConfig(top_k=1)
        ) as rm,
    ):
        torch.testing.assert_close(rm(input_ids=ids).logits, peft(input_ids=ids).logits)
        assert unwrap_lm(rm) is model
    assert not any(hasattr(m, "router") for m in model.modules())


def test_top_k_selects_per_token_per_layer(model, experts, ids) -> None:
    seen = {}
    with build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
        for name, router in rm.routers.items():
            router.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
        with torch.no_grad():
            rm(input_ids=ids)
    assert sorted(seen) == sorted(experts[0][1])
    for w in seen.values():
        assert torch.equal((w > 0).sum(-1), torch.full(ids.shape, 2))
        torch.testing.assert_close(w.sum(-1), torch.ones(ids.shape))
    choices = torch.stack([w.argmax(-1) for w in seen.values()])
    assert len(choices.unique()) > 1  # different tokens and layers pick different experts


def test_prototype_cache_via_build(model, experts, tmp_path) -> None:
    sums = [f"c{i}" for i in range(4)]
    build_routed_model(model, experts, checksums=sums, cache_dir=tmp_path).detach()
    assert (tmp_path / CACHE_FILE).exists()
    cached = arrow_prototypes(experts, checksums=sums, cache_path=tmp_path / CACHE_FILE)
    for m, p in arrow_prototypes(experts).items():
        torch.testing.assert_close(cached[m], p)


@pytest.mark.parametrize("method", ROUTERS.names())
def test_router_contract(method: str, model, experts) -> None:
    """Every registered router: one router per module, weights over E_m, rows sum to 1."""
    spec = ROUTERS.get(method)
    # routers that need trained or derived state (PHATGOOSE's gates, retrieval's expert
    # embeddings) get random ones here
    gates = [{m: torch.randn(f.A.shape[1]) for m, f in fs.items()} for _, fs in experts]
    embs = torch.randn(len(experts), model.config.hidden_size)
    extras = {"phatgoose_gates": gates, "retrieval_embeddings": embs}
    ctx = RouterContext(experts=experts, extras=extras, model=model)
    routers = spec.build(spec.config_cls(), ctx)
    assert set(routers) <= set(experts[0][1]) and routers
    with torch.no_grad():  # a forward of the model: sequence-level routers read their input
        model(input_ids=torch.randint(3, 90, (2, 3)))
    for m, router in routers.items():
        d_in = experts[0][1][m].A.shape[1]
        w = router(torch.randn(2, 3, d_in))
        assert w.shape == (2, 3, len(experts)) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
        if router.top_k is not None:
            assert ((w > 0).sum(-1) <= router.top_k).all()
        if hasattr(router, "release"):
            router.release()


def _pad(seqs: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_stats_exclude_padding(model, experts, left: bool) -> None:
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 128, (n,), generator=g) for n in (9, 4, 6)]
    ids, mask = _pad(seqs, left)
    with torch.no_grad(), build_routed_model(model, experts) as rm:
        with rm.record() as batched:
            rm(input_ids=ids, attention_mask=mask)
        with rm.record() as alone:
            for s in seqs:
                rm(input_ids=s[None])
    assert batched.tokens == alone.tokens == 19
    pm_b, pm_a = batched.per_module(), alone.per_module()
    assert sorted(pm_b) == sorted(experts[0][1])
    for m in pm_b:
        assert sum(pm_b[m]) == pytest.approx(1.0, abs=1e-5)
        assert pm_b[m] == pytest.approx(pm_a[m], abs=1e-4)
    assert batched.overall() == pytest.approx(alone.overall(), abs=1e-4)
    assert sorted(batched.per_layer()) == ["0", "1"]


def test_stats_during_generation_and_fixed_weights(model, experts) -> None:
    prompt, mask = _pad([torch.arange(3, 10), torch.arange(20, 24)], left=True)
    with torch.no_grad(), build_routed_model(model, experts) as rm, rm.record() as stats:
        rm.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert stats.tokens == 7 + 4 + 2 * 3 - 2  # the last new tokens are never fed back
    with torch.no_grad(), attach(model, experts, weights=torch.tensor([0.1, 0.2, 0.3, 0.4])) as h:
        with recording(model, h.state, h.expert_names) as fixed:
            model(input_ids=prompt, attention_mask=mask)
    assert fixed.overall() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-6)
    assert fixed.tokens == 11


def test_routing_report(model, experts, ids, tmp_path) -> None:
    by_task = {}
    with torch.no_grad(), build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
        for t in ("task_a", "task_b"):
            with rm.record() as stats:
                rm(input_ids=ids if t == "task_a" else ids.flip(1))
            by_task[t] = stats
        describe = rm.describe()
    json_path, png_path = save_routing_report(by_task, tmp_path / "routing", config=describe)
    assert json_path.name == "routing.json" and png_path.name == "routing.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(json_path.read_text())
    assert doc["experts"] == ["e0", "e1", "e2", "e3"]
    assert doc["config"]["config"] == {
        "top_k": 2, "temperature": 1.0, "mix": "output", "gks": "none", "gks_experts": []
    }  # fmt: skip
    assert doc["tasks"]["task_a"]["overall"] == pytest.approx(by_task["task_a"].overall())
    assert sum(doc["tasks"]["task_b"]["overall"]) == pytest.approx(1.0)
    assert doc["tasks"]["task_a"]["tokens"] == ids.numel()
    with pytest.raises(LorashelfError, match="no routing statistics"):
        save_routing_report({}, tmp_path / "x.json")


def test_partial_experts_route_where_they_exist(kit, model, shapes, ids) -> None:
    q_only = {m: f for m, f in kit.random_factors(shapes, r=2, seed=9).items() if "q_proj" in m}
    experts = [("full", kit.random_factors(shapes, seed=8)), ("q_only", q_only)]
    with torch.no_grad(), build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
        assert {m: r.prototypes.shape[0] for m, r in rm.routers.items()} == {
            m: 2 if "q_proj" in m else 1 for m in shapes
        }
        with rm.record() as stats:
            rm(input_ids=ids)
    for m, w in stats.per_module().items():
        if "v_proj" in m:
            assert w == pytest.approx([1.0, 0.0])
        else:
            assert w[1] > 0 and sum(w) == pytest.approx(1.0)


def test_params_mix_through_build(model, experts, ids) -> None:
    outs = {}
    with torch.no_grad():
        for mix in ("output", "params"):
            with build_routed_model(model, experts, config=ArrowConfig(top_k=2, mix=mix)) as rm:
                assert all(layer.state.mix == mix for layer in rm.handle.layers.values())
                outs[mix] = rm(input_ids=ids).logits
    assert torch.isfinite(outs["params"]).all()
    assert (outs["params"] - outs["output"]).abs().max() > 1e-4


def test_scoring_with_shared_prompt_cache_matches_plain(kit, tiny_model, tiny_tokenizer) -> None:
    """Per-token routing is independent of batching and of the KV cache: the scorer's
    prompt-sharing path gives the plain path's log-probabilities, and stats see the
    same real tokens."""
    from lorashelf.evaluate.scoring import score_continuations

    model = copy.deepcopy(tiny_model)
    shapes = kit.module_shapes(model)
    experts = [(f"e{i}", kit.random_factors(shapes, seed=20 + i)) for i in range(3)]
    pairs = [("The cat sat on", " the mat"), ("The cat sat on", " a hat"), ("Go", " home now")]
    with build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
        with rm.record() as shared_stats:
            shared = score_continuations(rm, tiny_tokenizer, pairs, batch_size=2)
        plain = score_continuations(rm, tiny_tokenizer, pairs, batch_size=1, share_prompt=False)
    for a, b in zip(shared, plain):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # prompts run once each (+ BOS), continuations once each
    n_prompt = sum(len(tiny_tokenizer(p)["input_ids"]) for p in ("The cat sat on", "Go"))
    n_cont = sum(len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in pairs)
    assert shared_stats.tokens == n_prompt + n_cont


def test_bf16_routing(model, experts, ids) -> None:
    with torch.no_grad():
        base = model(ids).logits
        with build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
            want = rm(input_ids=ids).logits
        model.to(torch.bfloat16)
        with build_routed_model(model, experts, config=ArrowConfig(top_k=2)) as rm:
            assert all(r.prototypes.device == ids.device for r in rm.routers.values())
            got = rm(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # bf16 may flip a near-tie top-k choice, so compare on average against the effect size
    err = (got.float() - want).abs().mean()
    assert err < 0.05 * (want - base).abs().mean()
