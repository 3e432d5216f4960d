"""TIES against a hand-computed case and a plain loop-over-entries reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorashelf.merge import TiesConfig, merge
from lorashelf.merge import ties as ties_module
from lorashelf.merge.ties import kth_largest_abs


class F:
    """Bare factors: delta = scale * B @ A."""

    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, scale


def as_delta_expert(values: list[float]) -> dict[str, F]:
    """One 2x2 module whose delta is exactly ``values`` (A = I, scale 1)."""
    return {"m": F(torch.eye(2), torch.tensor(values).view(2, 2))}


# Three task vectors of four entries; density 0.5 keeps two entries of each.
#   trimmed: [0.5, 0, 0, -0.8], [0, 0.6, -0.4, 0], [0.9, 0, 0.7, 0]
#   mass:    [1.4, 0.6, 0.3, -0.8] -> signs + + + -
#   disjoint mean: (0.5+0.9)/2, 0.6, 0.7 (-0.4 disagrees), -0.8
HAND = [[0.5, -0.1, 0.3, -0.8], [-0.2, 0.6, -0.4, 0.1], [0.9, 0.05, 0.7, -0.3]]
HAND_RESULT = [0.7, 0.6, 0.7, -0.8]


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_hand_computed_case(scope, lam):
    experts = [as_delta_expert(v) for v in HAND]
    merged = merge(experts, "ties", TiesConfig(density=0.5, lam=lam, scope=scope))
    expected = torch.tensor(HAND_RESULT) * lam
    assert torch.allclose(merged.delta("m").flatten(), expected, atol=1e-6)


def reference_ties(vectors: np.ndarray, density: float, lam: float) -> np.ndarray:
    """Straight from the paper: loop over experts to trim, over entries to merge."""
    n_exp, n = vectors.shape
    k = min(n, max(1, round(density * n)))
    trimmed = np.zeros_like(vectors)
    for e in range(n_exp):
        keep = np.argsort(-np.abs(vectors[e]), kind="stable")[:k]
        trimmed[e, keep] = vectors[e, keep]
    out = np.zeros(n)
    for j in range(n):
        sign = np.sign(trimmed[:, j].sum())
        agree = [t for t in trimmed[:, j] if t != 0 and np.sign(t) == sign]
        out[j] = lam * np.mean(agree) if agree else 0.0
    return out


SHAPES = {"a": (6, 5), "b": (4, 5), "c": (3, 7)}  # name -> (d_out, d_in)


def random_experts(n_exp=4, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: F(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 0.5)
            for n, (o, i) in SHAPES.items()
        }
        for _ in range(n_exp)
    ]


def task_vector(expert, names, space) -> np.ndarray:
    parts = []
    for n in names:
        f = expert[n]
        if space == "delta":
            parts.append((f.scale * f.B @ f.A).flatten())
        else:
            parts += [f.A.flatten(), f.B.flatten()]
    return torch.cat(parts).double().numpy()


def merged_vector(merged, names, space) -> np.ndarray:
    parts = []
    for n in names:
        e = merged.modules[n]
        parts += [merged.delta(n).flatten()] if space == "delta" else [e.A.flatten(), e.B.flatten()]
    return torch.cat(parts).double().numpy()


@pytest.mark.parametrize("space", ["delta", "params"])
@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_matches_reference(space, scope, density, lam):
    experts = random_experts()
    names = sorted(SHAPES)
    merged = merge(experts, "ties", TiesConfig(density=density, lam=lam, space=space, scope=scope))
    groups = [names] if scope == "global" else [[n] for n in names]
    expected, got = [], []
    for group in groups:
        vectors = np.stack([task_vector(ex, group, space) for ex in experts])
        expected.append(reference_ties(vectors, density, lam))
        got.append(merged_vector(merged, group, space))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(expected), atol=1e-5)
    if space == "params":
        assert all(e.rank == 2 and e.scale == 0.5 for e in merged.modules.values())


def test_streamed_blocks_and_coarse_histogram_give_the_same_merge(monkeypatch):
    experts = random_experts(seed=1)
    cfg = TiesConfig(density=0.3)
    whole = merge(experts, "ties", cfg)
    monkeypatch.setattr(ties_module, "BLOCK_ELEMS", 9)  # one or two rows per block
    monkeypatch.setattr(ties_module, "BIN_SHIFT", 28)  # 8 bins: the threshold's bin is full
    streamed = merge(experts, "ties", cfg)
    for n in SHAPES:
        assert torch.allclose(whole.delta(n), streamed.delta(n), atol=1e-6)


@pytest.mark.parametrize("shift", [30, 27, ties_module.BIN_SHIFT])  # 2, 16, 65536 bins
def test_kth_largest_abs_is_exact(monkeypatch, shift):
    monkeypatch.setattr(ties_module, "BIN_SHIFT", shift)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3, 500, generator=g)
    data[:, :100] = data[:, 100:200].round(decimals=1)  # duplicates
    data[1, 300:] = 0.0  # many zeros
    data[2] = 0.0  # an all-zero task vector
    blocks = [data[:, :7], data[:, 7:250], data[:, 250:]]
    ordered = data.abs().sort(1, descending=True).values
    for k in [1, 2, 50, 333, 499, 500]:
        got = kth_largest_abs(lambda: iter(blocks), k)
        assert torch.equal(got, ordered[:, k - 1])


def test_differing_scales_fold_into_b_in_params_space():
    experts = random_experts(n_exp=2)
    for n, f in experts[1].items():
        experts[1][n] = F(f.A, f.B, 2.0)
    merged = merge(experts, "ties", TiesConfig(density=1.0, space="params", scope="module"))
    f0, f1 = experts[0]["a"], experts[1]["a"]
    vectors = np.stack(
        [torch.cat([f.A.flatten(), (f.scale * f.B).flatten()]).double().numpy() for f in (f0, f1)]
    )
    expected = reference_ties(vectors, 1.0, 1.0)
    got = merged.modules["a"]
    assert got.scale == 1.0
    np.testing.assert_allclose(merged_vector(merged, ["a"], "params"), expected, atol=1e-6)
