"""Core Space merging against its dense-space definition.

The reference builds every dense delta in float64, takes the reference bases from
``torch.linalg.svd`` of the stacked factors (not lorashelf's QR route), projects each
delta to its core ``U^T delta V``, runs TIES entry by entry on the cores (all modules'
cores concatenated per expert for scope="global") and projects back with ``U M V^T``.
"""

from __future__ import annotations

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.merge import merge
from lorashelf.merge.core_space import CoreSpaceConfig, core_basis


class F:
    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, scale


SHAPES = {"a": (9, 8), "b": (4, 10), "c": (12, 7)}  # R = 6 < some dims, > others


def random_experts(ranks=(2, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: F(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 0.5 + e)
            for n, (o, i) in SHAPES.items()
        }
        for e, r in enumerate(ranks)
    ]


def dense_bases(fs):
    A = torch.cat([f.A.double() for f in fs])
    B = torch.cat([f.scale * f.B.double() for f in fs], 1)
    U = torch.linalg.svd(B, full_matrices=False).U
    V = torch.linalg.svd(A, full_matrices=False).Vh.T
    return U, V


def reference_ties(vectors, density, lam):
    """``vectors`` [E, n]: trim each row to its top-k |values|, elect, disjoint mean."""
    n = vectors.shape[1]
    k = min(n, max(1, round(density * n)))
    trimmed = torch.zeros_like(vectors)
    for e in range(vectors.shape[0]):
        keep = vectors[e].abs().argsort(descending=True)[:k]
        trimmed[e, keep] = vectors[e, keep]
    out = torch.zeros(n, dtype=vectors.dtype)
    for j in range(n):
        total = trimmed[:, j].sum()
        agree = [v for v in trimmed[:, j].tolist() if v != 0 and (v > 0) == (total > 0)]
        out[j] = lam * sum(agree) / len(agree) if agree and total != 0 else 0.0
    return out


def reference_core_ties(experts, density, lam, scope):
    names = sorted(SHAPES)
    bases, cores = {}, {}
    for n in names:
        fs = [ex[n] for ex in experts]
        U, V = bases[n] = dense_bases(fs)
        cores[n] = torch.stack([U.T @ (f.scale * f.B.double() @ f.A.double()) @ V for f in fs])
    groups = [names] if scope == "global" else [[n] for n in names]
    out = {}
    for group in groups:
        flat = torch.cat([cores[n].flatten(1) for n in group], 1)
        merged, at = reference_ties(flat, density, lam), 0
        for n in group:
            size = cores[n][0].numel()
            M = merged[at : at + size].view(cores[n].shape[1:])
            at += size
            U, V = bases[n]
            out[n] = U @ M @ V.T
    return out


def test_task_arithmetic_in_core_space_is_the_plain_sum():
    experts = random_experts()
    merged = merge(experts, "core-space", CoreSpaceConfig(core_merge="task-arithmetic", lam=0.7))
    assert merged.is_low_rank
    for n in SHAPES:
        expected = 0.7 * sum(f.scale * f.B.double() @ f.A.double() for f in [e[n] for e in experts])
        torch.testing.assert_close(merged.delta(n).double(), expected, atol=1e-5, rtol=1e-5)
        assert merged.modules[n].rank == min(6, SHAPES[n][0])  # k = min(d_out, sum of ranks)


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 0.6), (1.0, 1.0)])
def test_ties_in_core_space_matches_dense_reference(scope, density, lam):
    experts = random_experts()
    cfg = CoreSpaceConfig(density=density, lam=lam, scope=scope)
    merged = merge(experts, "core-space", cfg)
    expected = reference_core_ties(experts, density, lam, scope)
    for n in SHAPES:
        torch.testing.assert_close(merged.delta(n).double(), expected[n], atol=1e-5, rtol=1e-5)


def test_each_expert_is_exactly_its_core_in_the_basis():
    experts = random_experts(seed=3)
    fs = [ex["c"] for ex in experts]
    basis = core_basis(fs, torch.device("cpu"))
    for f in fs:
        back = basis.U @ basis.core(f) @ basis.V.T
        torch.testing.assert_close(back, f.scale * f.B @ f.A, atol=1e-5, rtol=1e-5)
    eye = torch.eye(basis.U.shape[1])
    torch.testing.assert_close(basis.U.T @ basis.U, eye, atol=1e-5, rtol=0)


def test_ties_in_core_space_is_not_ties_on_deltas():
    experts = random_experts()
    core = merge(experts, "core-space", CoreSpaceConfig(density=0.3))
    dense = merge(experts, "ties", {"density": 0.3})
    assert not torch.allclose(core.delta("a"), dense.delta("a"), atol=1e-3)


def test_bad_options():
    with pytest.raises(LorashelfError, match="core_merge must be one of"):
        CoreSpaceConfig(core_merge="dare")
    with pytest.raises(LorashelfError, match="density must be in"):
        CoreSpaceConfig(density=1.5)
