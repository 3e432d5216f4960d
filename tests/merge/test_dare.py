"""DARE against a dense reference and against PEFT's ``add_weighted_adapter``.

The reference builds every dense delta ``scale * B @ A`` in float64, draws each
expert's whole mask at once from the documented per-(module, expert) seed, and sums
(dare-linear) or elects and averages entry by entry (dare-ties).

PEFT: ``dare_linear_svd`` / ``dare_ties_svd`` drop entries of each expert's
``get_delta_weight()``, the same definition as lorashelf's; ``dare_linear`` /
``dare_ties`` (no ``_svd``) drop entries of LoRA A and B separately and so are a
different merge (no entry of any delta is dropped; cross terms B_i A_j appear), not
compared. PEFT draws its masks from the global RNG, so the test seeds that RNG with
lorashelf's seed of the (module, expert) whose delta PEFT is about to prune; the rest
(masking, rescaling, weighting, electing, averaging) is PEFT's own code. Its merge is
then truncated by SVD at full rank (64), so it agrees up to float32 SVD round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from lorashelf.errors import LorashelfError
from lorashelf.merge import merge
from lorashelf.merge import ties as ties_module
from lorashelf.merge.dare import DareLinearConfig, DareTiesConfig, mask_seed
from lorashelf.merge.ties import TiesConfig


class F:
    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, scale


SHAPES = {"a": (6, 5), "b": (4, 5), "c": (3, 7)}


def random_experts(n_exp=4, ranks=(2, 3, 2, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: F(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 0.5 + e)
            for n, (o, i) in SHAPES.items()
        }
        for e, r in zip(range(n_exp), ranks)
    ]


def reference(experts, name, density, seed):
    """Dropped and rescaled dense deltas ``[E, d_out, d_in]`` of one module, float64."""
    out = []
    for e, ex in enumerate(experts):
        f = ex[name]
        delta = f.scale * f.B.double() @ f.A.double()
        g = torch.Generator().manual_seed(mask_seed(seed, name, e))
        mask = torch.bernoulli(torch.full((delta.numel(),), density), generator=g)
        out.append(delta * mask.view(delta.shape).double() / density)
    return torch.stack(out)


def reference_ties(dropped, lam):
    """Entry by entry: the sign of the sum, then the mean of the agreeing experts."""
    flat = dropped.flatten(1)
    out = torch.zeros(flat.shape[1], dtype=flat.dtype)
    for j in range(flat.shape[1]):
        col = flat[:, j]
        agree = [v for v in col.tolist() if v != 0 and (v > 0) == (col.sum() > 0)]
        out[j] = lam * sum(agree) / len(agree) if agree and col.sum() != 0 else 0.0
    return out.view(dropped.shape[1:])


@pytest.mark.parametrize("density,seed", [(0.3, 0), (0.5, 7), (1.0, 1)])
def test_dare_linear_matches_dense_reference(density, seed):
    experts = random_experts()
    merged = merge(experts, "dare-linear", DareLinearConfig(density, scale=0.7, dare_seed=seed))
    for n in SHAPES:
        expected = 0.7 * reference(experts, n, density, seed).sum(0)
        torch.testing.assert_close(merged.delta(n).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density,seed", [(0.3, 0), (0.6, 3)])
def test_dare_ties_matches_dense_reference(density, seed):
    experts = random_experts()
    merged = merge(experts, "dare-ties", DareTiesConfig(density, lam=0.5, dare_seed=seed))
    for n in SHAPES:
        expected = reference_ties(reference(experts, n, density, seed), 0.5)
        torch.testing.assert_close(merged.delta(n).double(), expected, atol=1e-5, rtol=1e-5)


def test_masks_drop_the_right_fraction_and_depend_on_the_seed():
    experts = random_experts()
    a = merge(experts, "dare-linear", DareLinearConfig(0.3, dare_seed=0))
    again = merge(experts, "dare-linear", DareLinearConfig(0.3, dare_seed=0))
    b = merge(experts, "dare-linear", DareLinearConfig(0.3, dare_seed=1))
    assert all(torch.equal(a.delta(n), again.delta(n)) for n in SHAPES)
    assert not torch.equal(a.delta("a"), b.delta("a"))
    big = [{"m": F(torch.ones(1, 400), torch.ones(500, 1))}]
    kept = (merge(big, "dare-linear", DareLinearConfig(0.3)).delta("m") != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.01  # 200,000 Bernoulli(0.3) draws
    values = merge(big, "dare-linear", DareLinearConfig(0.3)).delta("m")
    assert torch.allclose(values[values != 0], torch.tensor(1 / 0.3))  # rescaled by 1/density


def test_density_one_is_task_arithmetic_and_ties_without_trim():
    experts = random_experts()
    linear = merge(experts, "dare-linear", DareLinearConfig(1.0, scale=0.5))
    ties_ = merge(experts, "dare-ties", DareTiesConfig(1.0, lam=0.5))
    plain = merge(experts, "task-arithmetic", {"scale": 0.5})
    full_ties = merge(experts, "ties", TiesConfig(density=1.0, lam=0.5))
    for n in SHAPES:
        torch.testing.assert_close(linear.delta(n), plain.delta(n), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ties_.delta(n), full_ties.delta(n), atol=1e-6, rtol=1e-6)


def test_masks_do_not_depend_on_streaming_or_on_other_modules(monkeypatch):
    experts = random_experts(seed=1)
    cfg = DareTiesConfig(0.4, dare_seed=5)
    whole = merge(experts, "dare-ties", cfg)
    only_b = merge([{"b": ex["b"]} for ex in experts], "dare-ties", cfg)
    monkeypatch.setattr(ties_module, "BLOCK_ELEMS", 9)  # one or two rows per block
    streamed = merge(experts, "dare-ties", cfg)
    assert all(torch.equal(whole.delta(n), streamed.delta(n)) for n in SHAPES)
    assert torch.equal(whole.delta("b"), only_b.delta("b"))


def test_bad_options():
    with pytest.raises(LorashelfError, match="density .* must be in"):
        DareLinearConfig(density=0.0)
    with pytest.raises(LorashelfError, match="dare_seed must be in"):
        DareTiesConfig(dare_seed=-1)


# ---- PEFT ----------------------------------------------------------------------------

PEFT_TARGETS = ["q_proj", "up_proj"]  # min(d_out, d_in) = 64 each: one full SVD rank


@pytest.fixture(scope="module")
def peft_setup(tiny_model, kit, factors_of):
    """One PeftModel holding three random experts as adapters e0, e1, e2."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": PEFT_TARGETS}
    sources = [kit.peft_lora(tiny_model, seed=s, **lora) for s in (11, 12, 13)]
    model = copy.deepcopy(sources[0])
    for e in (1, 2):
        model.add_adapter(f"e{e}", LoraConfig(lora_dropout=0.0, **lora))
    model.base_model.model.load_state_dict(
        {
            k.replace(".default.", f".e{e}."): v
            for e, src in enumerate(sources)
            if e
            for k, v in src.base_model.model.state_dict().items()
            if ".lora_" in k
        },
        strict=False,
    )
    experts = [factors_of(src) for src in sources]
    return model, experts


def peft_merge(model, experts, combination, density, weight, seed, monkeypatch):
    """PEFT's merge, its global RNG seeded per (module, expert) as lorashelf seeds."""
    deltas = {(n, e): (f.scale * f.B @ f.A) for e, ex in enumerate(experts) for n, f in ex.items()}
    original = merge_utils.random_pruning

    def seeded(tensor, density, rescale):
        (key,) = [k for k, d in deltas.items() if d.shape == tensor.shape and d.allclose(tensor)]
        torch.manual_seed(mask_seed(seed, *key))
        return original(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    model = copy.deepcopy(model)
    names = ["default", "e1", "e2"]
    with torch.random.fork_rng():
        model.add_weighted_adapter(
            names, [weight] * 3, "merged", combination_type=combination, svd_rank=64,
            density=density,
        )  # fmt: skip
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "merged" in mod.lora_A:
            out[name] = mod.get_delta_weight("merged")
    return out


def test_peft_delta_space_variants_match(peft_setup, monkeypatch):
    model, experts = peft_setup
    for ours, theirs, cfg in [
        ("dare-linear", "dare_linear_svd", DareLinearConfig(0.3, scale=0.6, dare_seed=4)),
        ("dare-ties", "dare_ties_svd", DareTiesConfig(0.3, lam=0.6, dare_seed=4)),
    ]:
        with torch.no_grad():
            peft_deltas = peft_merge(model, experts, theirs, 0.3, 0.6, 4, monkeypatch)
        merged = merge(experts, ours, cfg)
        assert set(peft_deltas) == set(merged.names())
        for n, delta in peft_deltas.items():
            ref = merged.delta(n)
            torch.testing.assert_close(delta, ref, atol=1e-5 * ref.abs().max(), rtol=0)
