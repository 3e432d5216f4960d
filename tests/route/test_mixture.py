"""The mixture-of-LoRA layer against plain per-expert matmuls, PEFT, and itself."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from lorashelf.errors import LorashelfError
from lorashelf.lora import attach
from lorashelf.route.arrow import ArrowRouter

D_IN, D_OUT = 24, 40


class Net(nn.Module):
    """One linear layer at path "proj", for layer-level checks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_experts(kit, ranks=(4, 4, 4), seed=0):
    return [
        (f"x{i}", kit.random_factors({"proj": (D_OUT, D_IN)}, r=r, seed=seed + i, scale=0.5 + i))
        for i, r in enumerate(ranks)
    ]


def manual(net: Net, experts, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: base output plus each expert's scale * B A x times its weight, one by one."""
    y = getattr(net.proj, "base_layer", net.proj)(x)
    w = w.expand(*x.shape[:-1], len(experts)) if w.dim() == 1 else w
    for e, (_, f) in enumerate(experts):
        if "proj" in f:
            f = f["proj"]
            y = y + w[..., e : e + 1] * f.scale * (x @ f.A.T @ f.B.T)
    return y


def test_fixed_weights_equal_per_expert_sum(kit) -> None:
    net, experts = Net(), layer_experts(kit)
    x = torch.randn(2, 5, D_IN)
    w = torch.tensor([0.5, -1.0, 2.0])
    want = manual(net, experts, x, w)
    with attach(net, experts, weights=w):
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", ["output", "params"])
def test_fixed_weights_fast_path(kit, mix: str) -> None:
    """Fixed weights without gradient skip zero-weight experts and fold the weights into
    the factors; the result equals the general path (weights that require grad)."""
    net, experts = Net(), layer_experts(kit, ranks=(4, 2, 4, 3))
    x = torch.randn(2, 5, D_IN)
    for w in ([0.0, 1.0, 0.0, 0.0], [0.5, 0.0, -1.0, 2.0], [0.0] * 4):
        w = torch.tensor(w)
        with attach(net, experts, weights=w.clone().requires_grad_(True), mix=mix):
            with torch.no_grad():
                want = net(x)
        with torch.no_grad(), attach(net, experts, weights=w, mix=mix):
            torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), attach(net, experts, weights=torch.zeros(4)) as handle:
        assert torch.equal(net(x), net.proj.base_layer(x))
        handle.state.weights[1] = 1.0  # an in-place edit is seen (no stale cache)
        torch.testing.assert_close(net(x), manual(net, experts, x, handle.state.weights))


def test_per_sequence_weights_equal_each_sequence_alone(kit) -> None:
    net, experts = Net(), layer_experts(kit)
    x = torch.randn(3, 5, D_IN)
    w = torch.randn(3, 3)
    with attach(net, experts, weights=w) as handle:
        together = net(x)
        for b in range(3):
            handle.set_weights(w[b])
            torch.testing.assert_close(together[b], net(x[b]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(together[b], manual(net, experts, x[b], w[b]))


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 3)])
def test_per_sequence_params_mix_equals_each_sequence_alone(kit, ranks) -> None:
    """The per-row factor mixing (rank r per token) against the folded single-row path
    and the mixed factors written out by hand, values and gradients in the weights."""
    net, experts = Net(), layer_experts(kit, ranks=ranks)
    x = torch.randn(3, 5, D_IN)
    w = torch.randn(3, 3, requires_grad=True)
    with attach(net, experts, weights=w, mix="params") as handle:
        together = net(x)
        together.square().sum().backward()
        for b in range(3):
            handle.set_weights(w[b].detach())
            torch.testing.assert_close(together[b], net(x[b]), rtol=1e-5, atol=1e-5)
            f = [fs["proj"] for _, fs in experts]
            r = max(ranks)  # mixed ranks are mixed as if zero-padded to the largest
            pad_a = [torch.cat([fi.A, fi.A.new_zeros(r - fi.A.shape[0], D_IN)]) for fi in f]
            pad_b = [torch.cat([fi.B, fi.B.new_zeros(D_OUT, r - fi.B.shape[1])], 1) for fi in f]
            a = sum(wi * ai for wi, ai in zip(w[b].detach(), pad_a))
            bm = sum(wi * fi.scale * bi for wi, fi, bi in zip(w[b].detach(), f, pad_b))
            want = net.proj.base_layer(x[b]) + x[b] @ a.T @ bm.T
            torch.testing.assert_close(together[b].detach(), want, rtol=1e-5, atol=1e-5)
    grad = w.grad.clone()
    w2 = w.detach().clone().requires_grad_(True)
    with attach(net, experts, weights=w2, mix="params") as handle:
        net.proj.state.mix = "params"
        out = net.proj._dense(x, handle.layers["proj"]._local(w2, x)) + net.proj.base_layer(x)
        out.square().sum().backward()
    torch.testing.assert_close(grad, w2.grad, rtol=1e-4, atol=1e-4)


def test_router_weights_top_k_equal_e_equal_per_expert_sum(kit) -> None:
    net, experts = Net(), layer_experts(kit)
    protos = torch.nn.functional.normalize(torch.randn(3, D_IN), dim=-1)
    router = ArrowRouter(protos, top_k=3, temperature=0.7)
    x = torch.randn(2, 5, D_IN)
    weights = (x @ protos.T).abs().div(0.7).softmax(-1)
    with attach(net, experts, routers={"proj": router}):
        torch.testing.assert_close(net(x), manual(net, experts, x, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", ["output", "params"])
def test_gather_strategy_equals_dense(kit, mix: str) -> None:
    net, experts = Net(), layer_experts(kit, ranks=(4, 2, 4, 3, 4, 1))
    router = ArrowRouter(torch.randn(6, D_IN), top_k=2, temperature=1.0)
    x = torch.randn(2, 7, D_IN)
    outs = {}
    for strategy in ("dense", "gather"):
        with attach(net, experts, routers={"proj": router}, mix=mix, strategy=strategy):
            outs[strategy] = net(x)
    torch.testing.assert_close(outs["gather"], outs["dense"], rtol=1e-5, atol=1e-5)


def test_sparse_strategy_equals_dense(kit) -> None:
    """The CSR path (sampled A x at the top-k columns, then B) gives the dense numbers,
    mixed ranks included; auto takes it only for big inference forwards on the CPU."""
    from lorashelf.lora import mixture

    net, experts = Net(), layer_experts(kit, ranks=(4, 2, 4, 3, 4, 1))
    router = ArrowRouter(torch.randn(6, D_IN), top_k=2, temperature=1.0)
    x = torch.randn(3, 9, D_IN)
    outs = {}
    with torch.no_grad():
        for strategy in ("dense", "sparse"):
            with attach(net, experts, routers={"proj": router}, strategy=strategy):
                outs[strategy] = net(x)
    torch.testing.assert_close(outs["sparse"], outs["dense"], rtol=1e-5, atol=1e-5)
    big = torch.randn(1, mixture.SPARSE_MIN_TOKENS, D_IN)
    choose = mixture._choose
    with torch.no_grad():
        assert choose("auto", 1, 48, big, "output") == "sparse"
        assert choose("auto", 1, 48, big, "params") == "dense"
        assert choose("auto", 1, 47, big, "output") == "dense"
        assert choose("auto", 1, 48, big[:, :8], "output") == "dense"  # decoding
    assert choose("auto", 1, 48, big.requires_grad_(), "output") == "dense"
    with attach(net, experts, routers={"proj": router}, mix="params", strategy="sparse"):
        with pytest.raises(LorashelfError, match="mix='output' only"):
            net(x)


def test_params_mix_equals_mixed_factors(kit) -> None:
    net, experts = Net(), layer_experts(kit, ranks=(4, 4, 4))
    w = torch.tensor([0.2, 0.5, 0.3])
    fs = [f["proj"] for _, f in experts]
    A_mix = sum(wi * f.A for wi, f in zip(w, fs))
    B_mix = sum(wi * f.scale * f.B for wi, f in zip(w, fs))
    x = torch.randn(4, D_IN)
    with attach(net, experts, weights=w, mix="params"):
        torch.testing.assert_close(net(x), net.proj.base_layer(x) + x @ A_mix.T @ B_mix.T)
    # per token: each token's own mixed factors
    router = ArrowRouter(torch.randn(3, D_IN), top_k=2, temperature=1.0)
    with attach(net, experts, routers={"proj": router}, mix="params"):
        out, wt = net(x), router(x)
        for t in range(4):
            a = sum(wt[t, e] * fs[e].A for e in range(3))
            b = sum(wt[t, e] * fs[e].scale * fs[e].B for e in range(3))
            torch.testing.assert_close(out[t], net.proj.base_layer(x[t]) + b @ (a @ x[t]))


def test_mixed_ranks_and_partial_modules(kit, model, shapes, ids) -> None:
    full = kit.random_factors(shapes, r=2, seed=1)
    partial = {m: f for m, f in kit.random_factors(shapes, r=6, seed=2).items() if "q_proj" in m}
    experts = [("r2", full), ("r6_q_only", partial)]
    w = torch.tensor([0.7, 1.3])
    ref = copy.deepcopy(model)
    with torch.no_grad():  # reference: fold each expert's delta into a copy of the weights
        for _, fs in experts:
            for m, f in fs.items():
                wt = 0.7 if fs is full else 1.3
                ref.get_submodule(m).weight += wt * f.scale * f.B @ f.A
        with attach(model, experts, weights=w):
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_one_expert_weight_one_equals_peft(kit, model, shapes, ids, tmp_path) -> None:
    factors = kit.random_factors(shapes, r=4, seed=5)
    path = kit.write_adapter(model, tmp_path / "a", factors, lora_alpha=8)
    loaded = kit.read_lora_factors(path)
    assert sorted(loaded) == sorted(shapes)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        with attach(model, [("a", loaded)], weights=[1.0]):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - model(input_ids=ids).logits).abs().max() > 1e-2  # the adapter matters


def test_detach_restores_exact_base(model, experts, ids) -> None:
    originals = {m: model.get_submodule(m) for m in experts[0][1]}
    with torch.no_grad():
        before = model(ids).logits
        handle = attach(model, experts, weights=torch.ones(4))
        assert not torch.equal(model(ids).logits, before)
        handle.detach()
        handle.detach()  # idempotent
        assert torch.equal(model(ids).logits, before)
    assert all(model.get_submodule(m) is mod for m, mod in originals.items())
    with attach(model, experts, weights=torch.ones(4)):
        pass
    assert all(model.get_submodule(m) is mod for m, mod in originals.items())


def test_generation_with_kv_cache_and_per_sequence_weights(model, experts) -> None:
    prompt = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    w = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0.2, 0.2, 0.2, 2.0]])
    with torch.no_grad(), attach(model, experts, weights=w) as handle:
        gen = model.generate(
            prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0
        )
        seq = prompt
        for _ in range(6):  # step by step, no cache, whole sequence each time
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(gen, seq)
        handle.set_weights(w[2])  # row 2 alone gives the same continuation
        alone = model.generate(prompt[2:], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(alone[0], gen[2])


def test_bf16(model, experts, ids) -> None:
    ref = model(ids).logits
    with torch.no_grad():
        with attach(model, experts, weights=torch.full((4,), 0.25)):
            want = model(ids).logits
        model.to(torch.bfloat16)
        with attach(model, experts, weights=torch.full((4,), 0.25)):
            got = model(ids).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err = (got.float() - want).abs().max()
    assert err < 0.1 * (want - ref).abs().max() + 0.05


def test_lora_dtype_float32_on_bf16_model_equals_peft(kit, model, shapes, ids, tmp_path) -> None:
    """PEFT keeps adapters in float32 on a bf16 base and casts activations up for the
    LoRA branch; lora_dtype=float32 computes the same numbers (the default rounds the
    LoRA branch in bf16 and does not)."""
    factors = kit.random_factors(shapes, r=4, seed=7)
    path = kit.write_adapter(model, tmp_path / "a", factors, lora_alpha=8)
    loaded = kit.read_lora_factors(path)
    model = copy.deepcopy(model).to(torch.bfloat16)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    assert (
        peft.base_model.model.get_submodule(next(iter(shapes))).lora_A["default"].weight.dtype
        == torch.float32
    )
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        with attach(model, [("a", loaded)], weights=[1.0], lora_dtype=torch.float32) as h:
            layer = next(iter(h.layers.values()))
            assert layer.A_all.dtype == torch.float32
            got = model(input_ids=ids).logits
            with torch.inference_mode():  # inference tensors carry no version counter
                assert torch.equal(model(input_ids=ids).logits, got)
        with attach(model, [("a", loaded)], weights=[1.0]):
            low = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    exact = (got.float() - want.float()).abs().max()
    assert exact <= 1e-6
    assert (low.float() - want.float()).abs().max() > exact  # the bf16 branch rounds differently
    with pytest.raises(LorashelfError, match="floating"):
        attach(model, [("a", loaded)], weights=[1.0], lora_dtype=torch.int8)


def test_gradients_wrt_weights_match_finite_differences(model, experts, ids) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    target = torch.randint(3, 128, ids.shape, generator=torch.Generator().manual_seed(3))

    def loss_at(w: torch.Tensor) -> torch.Tensor:
        handle.set_weights(w)
        logits = model(ids).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    for w0 in (torch.tensor([0.3, -0.2, 0.5, 0.1]), torch.rand(3, 4)):
        with attach(model, experts) as handle:
            w = w0.clone().requires_grad_(True)
            loss_at(w).backward()
            grad = w.grad.clone()
            fd = torch.zeros_like(w0)
            eps = 1e-2
            with torch.no_grad():
                for i in range(w0.numel()):
                    d = torch.zeros(w0.numel())
                    d[i] = eps
                    d = d.view_as(w0)
                    fd.view(-1)[i] = (loss_at(w0 + d) - loss_at(w0 - d)) / (2 * eps)
        assert grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, fd, rtol=2e-2, atol=2e-4)


def test_errors(kit, model, experts, ids) -> None:
    with pytest.raises(LorashelfError, match="no experts"):
        attach(model, [])
    with pytest.raises(LorashelfError, match="unique"):
        attach(model, [experts[0], experts[0]])
    with pytest.raises(LorashelfError, match="shape"):
        attach(model, experts, weights=torch.ones(3))
    with attach(model, experts) as handle:
        with pytest.raises(LorashelfError, match="no weights"):
            model(ids)
        handle.set_weights(torch.ones(2, 4))
        with pytest.raises(LorashelfError, match="2 rows"):
            model(ids)
        with pytest.raises(LorashelfError, match="already has a mixture"):
            attach(model, experts)
    wrong = [("big", kit.random_factors({"model.layers.0.self_attn.q_proj": (64, 32)}))]
    with pytest.raises(LorashelfError, match="another base model"):
        attach(model, wrong)
    mixed = experts[:1] + [
        ("odd", kit.random_factors({"model.layers.0.self_attn.q_proj": (64, 32)}))
    ]
    with pytest.raises(LorashelfError, match="e0.*odd|odd.*e0"):
        attach(model, mixed)
    missing = [("gpt", kit.random_factors({"transformer.h.0.attn.c_attn": (8, 8)}))]
    with pytest.raises(LorashelfError, match="not in the model"):
        attach(model, missing)
    with pytest.raises(LorashelfError, match="not nn.Linear"):
        attach(model, [("n", kit.random_factors({"model.norm": (64, 64)}))])
    with pytest.raises(LorashelfError, match="unknown mix"):
        attach(model, experts, mix="sum")
