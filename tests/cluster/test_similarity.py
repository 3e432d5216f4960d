"""Blocked similarity vs dense computations; sparsification; layout and seed checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lorashelf.cluster.embed import check_init_seeds, sparsify_
from lorashelf.cluster.similarity import (
    SimilarityConfig,
    dense_similarity,
    gram_matrix,
    parameter_similarity,
)
from lorashelf.errors import LorashelfError


def _sparsify_np(x: np.ndarray, q: float) -> np.ndarray:
    """Independent sparsification: zero the floor(q*D) smallest |x| per row by sorting."""
    x = x.copy()
    k = int(q * x.shape[1])
    for row in x:
        row[np.argsort(np.abs(row), kind="stable")[:k]] = 0
    return x


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 7, 15, 100, None])
def test_blocked_gram_equals_dense(planted, block_size):
    cfg = SimilarityConfig(sparsity=0.0, svd_dim=None, block_size=block_size)
    gram, _ = gram_matrix(planted.names, planted.load, cfg)
    x = planted.vectors().double()
    torch.testing.assert_close(gram, x @ x.T, rtol=1e-5, atol=1e-4)
    sim = parameter_similarity(planted.names, planted.load, cfg).matrix
    torch.testing.assert_close(sim, dense_similarity(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_size", [2, 5, None])
def test_blocked_sparse_svd_equals_dense(planted, block_size):
    cfg = SimilarityConfig(sparsity=0.6, svd_dim=3, block_size=block_size)
    sim = parameter_similarity(planted.names, planted.load, cfg)
    x = torch.from_numpy(_sparsify_np(planted.vectors().double().numpy(), 0.6))
    torch.testing.assert_close(sim.matrix, dense_similarity(x, svd_dim=3), rtol=0, atol=1e-6)
    assert sim.svd_dim == 3 and 0 < sim.svd_energy < 1


def test_svd_matches_sklearn_truncated_svd(planted):
    sklearn = pytest.importorskip("sklearn.decomposition")
    x = _sparsify_np(planted.vectors().double().numpy(), 0.5)
    emb = sklearn.TruncatedSVD(n_components=4, algorithm="arpack").fit_transform(x)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cfg = SimilarityConfig(sparsity=0.5, svd_dim=4, block_size=4)
    ours = parameter_similarity(planted.names, planted.load, cfg).matrix.numpy()
    np.testing.assert_allclose(ours, emb @ emb.T, atol=1e-6)


def test_svd_dim_at_least_n_is_no_reduction(planted):
    full = parameter_similarity(planted.names, planted.load, SimilarityConfig(0.0, None))
    big = parameter_similarity(planted.names, planted.load, SimilarityConfig(0.0, 64))
    assert big.svd_dim is None
    torch.testing.assert_close(big.matrix, full.matrix)


def test_sparsify_zeroes_the_smallest_fraction():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = sparsify_(x.clone(), 0.8)
    assert int((y == 0).sum()) == 800
    kept = y != 0
    assert x.abs()[kept].min() > x.abs()[~kept].max()
    torch.testing.assert_close(y[kept], x[kept])
    assert torch.equal(sparsify_(x.clone(), 0.0), x)
    z = sparsify_(x.to(torch.bfloat16), 0.5)
    assert z.dtype == torch.bfloat16 and int((z == 0).sum()) >= 500


def test_mismatched_shapes_name_the_expert_and_the_fix(planted):
    odd = planted.names[4]
    f = dict(planted.factors[odd])
    m = sorted(f)[1]
    f[m] = type(f[m])(torch.randn(8, 16), torch.randn(f[m].B.shape[0], 8), f[m].scale)
    planted.factors[odd] = f
    with pytest.raises(LorashelfError, match=rf"{odd}.*A \[8, 16\].*retrain or remove"):
        parameter_similarity(planted.names, planted.load, SimilarityConfig(block_size=2))


def test_different_modules_are_refused(planted):
    odd = planted.names[-1]
    planted.factors[odd] = dict(list(planted.factors[odd].items())[:2])
    with pytest.raises(LorashelfError, match="adapts different modules"):
        parameter_similarity(planted.names, planted.load)


def test_zero_expert_is_refused(planted):
    z = planted.names[2]
    planted.factors[z] = {
        m: type(f)(f.A * 0, f.B * 0, f.scale) for m, f in planted.factors[z].items()
    }
    with pytest.raises(LorashelfError, match=rf"{z}.*all-zero"):
        parameter_similarity(planted.names, planted.load)


def test_mixed_init_seeds_refused_unless_allowed():
    cards = {"a": {"init_seed": 0}, "b": {"init_seed": 0}, "c": {"init_seed": 1}}
    with pytest.raises(LorashelfError, match="--allow-mixed-init"):
        check_init_seeds(cards)
    with pytest.warns(UserWarning, match="2 different LoRA init seeds"):
        check_init_seeds(cards, allow_mixed=True)
    with pytest.warns(UserWarning, match="no init_seed"):
        check_init_seeds({"a": {"init_seed": 0}, "b": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_init_seeds({"a": {"init_seed": 3}, "b": {"init_seed": 3}})


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(svd_dim=0)])
def test_bad_similarity_config(bad):
    with pytest.raises(LorashelfError):
        SimilarityConfig(**bad)


@pytest.mark.parametrize("svd_dim", [None, 5])
def test_centred_blocked_equals_dense_centred(planted, svd_dim):
    cfg = SimilarityConfig(sparsity=0.0, svd_dim=svd_dim, block_size=4, center=True)
    sim = parameter_similarity(planted.names, planted.load, cfg).matrix
    x = planted.vectors().double()
    x = x - x.mean(0, keepdim=True)
    if svd_dim:  # independent reference: numpy SVD of the centred dense array
        u, s, _ = np.linalg.svd(x.numpy(), full_matrices=False)
        x = torch.from_numpy(u[:, :svd_dim] * s[:svd_dim])
    x = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sim, x @ x.T, rtol=0, atol=1e-5)
    raw = parameter_similarity(planted.names, planted.load, SimilarityConfig(0.0, svd_dim)).matrix
    assert not torch.allclose(sim, raw, atol=1e-3)


def test_centring_ignores_a_common_offset(planted):
    """Adding one vector to every expert (a shared init) changes raw cosines, not centred."""
    g = torch.Generator().manual_seed(3)
    offset = {
        m: (torch.randn(f.A.shape, generator=g) * 5, torch.randn(f.B.shape, generator=g) * 5)
        for m, f in planted.factors[planted.names[0]].items()
    }

    def shifted(name):
        return {
            m: type(f)(f.A + offset[m][0], f.B + offset[m][1], f.scale)
            for m, f in planted.load(name).items()
        }

    diff = {}
    for center in (True, False):
        cfg = SimilarityConfig(sparsity=0.0, svd_dim=None, center=center)
        a = parameter_similarity(planted.names, planted.load, cfg).matrix
        b = parameter_similarity(planted.names, shifted, cfg).matrix
        diff[center] = float((a - b).abs().max())
    assert diff[True] < 1e-3  # float32 products of the shifted vectors round, nothing more
    assert diff[False] > 0.1


def test_centring_two_experts_is_refused(planted):
    cfg = SimilarityConfig(sparsity=0.0, svd_dim=None, center=True)
    with pytest.raises(LorashelfError, match="at least 3"):
        parameter_similarity(planted.names[:2], planted.load, cfg)
