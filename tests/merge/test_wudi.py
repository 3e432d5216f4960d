"""WUDI against a dense float64 reference of the paper's objective and optimiser.

The reference builds every task vector ``tau_i = s_i B_i A_i`` densely, writes the
objective ``sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` as the paper does
and lets autograd and ``torch.optim.Adam`` minimise it from the sum of the task
vectors; lorashelf uses the low-rank form and a hand-written gradient.
"""

from __future__ import annotations

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.merge import merge
from lorashelf.merge.wudi import WudiConfig, problem


class F:
    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, scale


SHAPES = {"a": (6, 5), "b": (4, 9), "c": (3, 7)}


def random_experts(dtype=torch.float64, ranks=(2, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: F(
                torch.randn(r, i, generator=g, dtype=dtype),
                torch.randn(o, r, generator=g, dtype=dtype),
                0.5 + e,
            )
            for n, (o, i) in SHAPES.items()
        }
        for e, r in enumerate(ranks)
    ]


def dense_objective(tau_m, taus):
    return sum(((tau_m - t) @ t.T).square().sum() / t.square().sum() for t in taus)


def dense_wudi(fs, steps, lr):
    taus = [f.scale * f.B @ f.A for f in fs]
    tau_m = torch.nn.Parameter(torch.stack(taus).sum(0))
    opt = torch.optim.Adam([tau_m], lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = dense_objective(tau_m, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tau_m.detach(), taus


@pytest.mark.parametrize("steps,lr", [(1, 1e-3), (40, 1e-2), (300, 1e-5)])
def test_matches_dense_reference_and_lowers_the_objective(steps, lr):
    experts = random_experts()
    merged = merge(experts, "wudi", WudiConfig(steps=steps, lr=lr))
    for n in SHAPES:
        fs = [ex[n] for ex in experts]
        expected, taus = dense_wudi(fs, steps, lr)
        got = merged.delta(n).double()
        start = torch.stack(taus).sum(0)
        # float32 storage of the result: compare at its precision, and the step itself
        torch.testing.assert_close(got, expected, atol=1e-6 * start.abs().max(), rtol=1e-6)
        assert (got - start).abs().max() > 0.5 * lr  # it moved
        assert dense_objective(expected, taus) < dense_objective(start, taus)


def test_low_rank_objective_and_gradient_equal_the_dense_ones():
    experts = random_experts()
    fs = [ex["b"] for ex in experts]
    prob = problem(fs, torch.device("cpu"))
    taus = [f.scale * f.B @ f.A for f in fs]
    tau_m = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    loss = dense_objective(tau_m, taus)
    loss.backward()
    torch.testing.assert_close(prob.loss(tau_m.detach()), loss.detach())
    torch.testing.assert_close(prob.grad(tau_m.detach()), tau_m.grad)
    torch.testing.assert_close(prob.start, torch.stack(taus).sum(0))


def test_float32_factors_and_zero_steps():
    experts = random_experts(dtype=torch.float32)
    plain = merge(experts, "task-arithmetic")
    none = merge(experts, "wudi", WudiConfig(steps=0))
    for n in SHAPES:
        torch.testing.assert_close(none.delta(n), plain.delta(n), atol=1e-5, rtol=1e-5)
    moved = merge(experts, "wudi", WudiConfig(steps=50, lr=1e-2))
    ref = merge([{k: F(f.A.double(), f.B.double(), f.scale) for k, f in ex.items()}
                 for ex in experts], "wudi", WudiConfig(steps=50, lr=1e-2))  # fmt: skip
    for n in SHAPES:
        torch.testing.assert_close(moved.delta(n), ref.delta(n), atol=1e-4, rtol=1e-4)


def test_an_all_zero_expert_is_ignored():
    experts = random_experts()
    zero = {n: F(torch.zeros_like(f.A), f.B, f.scale) for n, f in experts[0].items()}
    with_zero = merge([*experts[1:], zero], "wudi", WudiConfig(steps=20, lr=1e-2))
    without = merge(experts[1:], "wudi", WudiConfig(steps=20, lr=1e-2))
    for n in SHAPES:
        assert torch.isfinite(with_zero.delta(n)).all()
        torch.testing.assert_close(with_zero.delta(n), without.delta(n))


def test_bad_options():
    with pytest.raises(LorashelfError, match="steps must be"):
        WudiConfig(steps=-1)
    with pytest.raises(LorashelfError, match="lr must be"):
        WudiConfig(lr=0.0)
