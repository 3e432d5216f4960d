"""KnOTS against its dense definition in float64.

The reference builds every dense delta, concatenates them side by side, takes
``torch.linalg.svd`` of that [d_out, T d_in] matrix (not lorashelf's QR route), keeps
the top k = sum-of-ranks singular triplets, splits V^T into the experts' blocks, runs
TIES entry by entry on the blocks (all modules' blocks concatenated per expert for
scope="global") and rebuilds ``U S V_merged^T``.
"""

from __future__ import annotations

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.merge import merge
from lorashelf.merge.knots import KnotsConfig, align


class F:
    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, scale


SHAPES = {"a": (9, 8), "b": (14, 10), "c": (12, 7), "d": (4, 10)}  # (d_out, d_in); ranks sum to 6


def random_experts(ranks=(2, 3, 1), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: F(
                torch.randn(r, i, generator=g, dtype=dtype),
                torch.randn(o, r, generator=g, dtype=dtype),
                0.5 + e,
            )
            for n, (o, i) in SHAPES.items()
        }  # fmt: skip
        for e, r in enumerate(ranks)
    ]


def reference_blocks(fs):
    """US [d_out, k] and the experts' V_t^T blocks from a full SVD of the dense concat."""
    W = torch.cat([f.scale * f.B.double() @ f.A.double() for f in fs], 1)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(sum(f.A.shape[0] for f in fs), S.numel())
    d_in = fs[0].A.shape[1]
    blocks = [Vh[:k, t * d_in : (t + 1) * d_in] for t in range(len(fs))]
    return U[:, :k] * S[:k], blocks


def reference_ties(vectors, density, lam):
    """``vectors`` [E, n]: trim each row to its top-k |values|, elect, disjoint mean."""
    n = vectors.shape[1]
    k = min(n, max(1, round(density * n)))
    trimmed = torch.zeros_like(vectors)
    for e in range(vectors.shape[0]):
        keep = vectors[e].abs().argsort(descending=True)[:k]
        trimmed[e, keep] = vectors[e, keep]
    total = trimmed.sum(0)
    agree = (trimmed != 0) & (trimmed.sign() == total.sign()) & (total != 0)
    count = agree.sum(0)
    mean = (trimmed * agree).sum(0) / count.clamp_min(1)
    return lam * torch.where(count > 0, mean, torch.zeros_like(mean))


def reference_knots(experts, density, lam, scope):
    names = sorted(SHAPES)
    parts = {n: reference_blocks([ex[n] for ex in experts]) for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    out = {}
    for group in groups:
        flat = torch.stack(
            [torch.cat([parts[n][1][e].flatten() for n in group]) for e in range(len(experts))]
        )
        merged, at = reference_ties(flat, density, lam), 0
        for n in group:
            US, blocks = parts[n]
            size = blocks[0].numel()
            out[n] = US @ merged[at : at + size].view(blocks[0].shape)
            at += size
    return out


def test_the_factored_svd_is_the_dense_one():
    experts = random_experts(seed=2)
    fs = [ex["b"] for ex in experts]
    a = align(fs, torch.device("cpu"))
    for f, block in zip(fs, a.blocks):  # every expert is exactly US V_t^T
        torch.testing.assert_close(a.US @ block, f.scale * f.B @ f.A, atol=1e-10, rtol=1e-10)
    US, _ = reference_blocks(fs)
    torch.testing.assert_close(a.US.norm(dim=0), US.norm(dim=0), atol=1e-10, rtol=1e-10)  # S


def test_task_arithmetic_is_the_plain_sum():
    experts = random_experts()
    merged = merge(experts, "knots", KnotsConfig(merge_on="task-arithmetic", lam=0.7))
    assert merged.is_low_rank
    for n, (d_out, _) in SHAPES.items():
        expected = 0.7 * sum(f.scale * f.B @ f.A for f in [e[n] for e in experts])
        torch.testing.assert_close(merged.delta(n).double(), expected, atol=1e-5, rtol=1e-5)
        assert merged.modules[n].rank == min(6, d_out)


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 0.6), (1.0, 1.0)])
@pytest.mark.parametrize("ranks", [(2, 3, 1), (2, 2, 2)])
def test_ties_on_the_blocks_matches_dense_reference(scope, density, lam, ranks):
    experts = random_experts(ranks)
    merged = merge(experts, "knots", KnotsConfig(density=density, lam=lam, scope=scope))
    expected = reference_knots(experts, density, lam, scope)
    for n in SHAPES:
        torch.testing.assert_close(merged.delta(n).double(), expected[n], atol=1e-5, rtol=1e-5)


def test_ties_on_the_blocks_is_neither_ties_on_deltas_nor_core_space():
    experts = random_experts(dtype=torch.float32)
    ours = merge(experts, "knots", {"density": 0.3}).delta("a")
    for other in ("ties", "core-space"):
        assert not torch.allclose(
            ours, merge(experts, other, {"density": 0.3}).delta("a"), atol=1e-3
        )


def test_bad_options():
    with pytest.raises(LorashelfError, match="merge_on must be one of"):
        KnotsConfig(merge_on="dare")
    with pytest.raises(LorashelfError, match="density must be in"):
        KnotsConfig(density=0.0)
