"""Clusterers on experts with a planted cluster structure; validation of requests."""

from __future__ import annotations

import pytest
import torch

from lorashelf.cluster.methods import (
    CLUSTERERS,
    ClusterConfig,
    ClusterContext,
    balanced_sizes,
    cluster_experts,
)
from lorashelf.cluster.metrics import adjusted_rand_index
from lorashelf.errors import LorashelfError


def _ctx(p, **kw) -> ClusterContext:
    return ClusterContext(p.names, p.cards, p.load, **kw)


def _fake_text_embedder(p):
    """Text embeddings that carry the planted family (stand-in for a real base model)."""
    g = torch.Generator().manual_seed(1)
    fam = torch.randn(3, 8, generator=g)

    def embed(names):
        rows = [fam[p.truth[p.names.index(n)]] + 0.2 * torch.randn(8, generator=g) for n in names]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    return embed


@pytest.mark.parametrize(
    "sparsity,svd_dim,block_size",
    [(0.0, None, None), (0.5, 64, 4), (0.8, 2, 3), (0.5, 3, 1), (0.0, 5, 15)],
)
def test_mbc_recovers_planted_families(planted, sparsity, svd_dim, block_size):
    cfg = ClusterConfig(method="mbc", k=3, sparsity=sparsity, svd_dim=svd_dim)
    c = cluster_experts(_ctx(planted, block_size=block_size), cfg)
    assert adjusted_rand_index(c.labels, planted.truth) == 1.0
    assert c.stats["mean_intra_cosine"] > c.stats["mean_inter_cosine"]
    assert sorted(c.stats["sizes"]) == [5, 5, 5]


def test_random_does_not_recover_and_keeps_sizes(planted):
    aris = []
    for seed in range(5):
        c = cluster_experts(_ctx(planted), ClusterConfig(method="random", k=3, seed=seed))
        assert sorted(c.stats["sizes"]) == [5, 5, 5]
        aris.append(adjusted_rand_index(c.labels, planted.truth))
    assert max(aris) < 1.0 and sum(aris) / len(aris) < 0.5
    c = cluster_experts(_ctx(planted), ClusterConfig(method="random", k=3, sizes=(8, 4, 3)))
    assert sorted(c.stats["sizes"]) == [3, 4, 8]


def test_embedding_method_uses_text_similarity(planted):
    ctx = _ctx(planted, text_embedder=_fake_text_embedder(planted))
    c = cluster_experts(ctx, ClusterConfig(method="embedding", k=3))
    assert c.similarity_kind == "text"
    assert adjusted_rand_index(c.labels, planted.truth) == 1.0


@pytest.mark.parametrize("method", ["mbc", "random"])
def test_deterministic_per_seed(make_experts, method):
    p = make_experts(families=4, per_family=4, noise=3.0, seed=5)  # ambiguous on purpose
    runs = [
        cluster_experts(_ctx(p), ClusterConfig(method=method, k=4, seed=s, n_init=1)).labels
        for s in (0, 0, 1, 2, 3)
    ]
    assert runs[0] == runs[1]
    if method == "random":
        assert any(r != runs[0] for r in runs[2:])


def test_labels_are_numbered_by_first_appearance(planted):
    c = cluster_experts(_ctx(planted), ClusterConfig(k=3))
    firsts = [c.labels.index(lab) for lab in range(3)]
    assert firsts == sorted(firsts) and c.labels[0] == 0
    assert [len(m) for m in c.members()] == c.stats["sizes"]


@pytest.mark.parametrize("method", CLUSTERERS.names())
def test_every_clusterer_returns_a_partition(planted, method):
    ctx = _ctx(planted, text_embedder=_fake_text_embedder(planted))
    c = cluster_experts(ctx, ClusterConfig(method=method, k=4, seed=1))
    assert len(c.labels) == len(planted.names) and sorted(set(c.labels)) == [0, 1, 2, 3]
    assert c.similarity.shape == (15, 15)


def test_balanced_sizes():
    assert balanced_sizes(10, 3) == (4, 3, 3)
    assert balanced_sizes(6, 6) == (1,) * 6


class _NoRead:
    """A loader that fails the test if any expert is read."""

    def __call__(self, name):
        raise AssertionError(f"read {name} although the request was invalid")


@pytest.mark.parametrize(
    "n,cfg,match",
    [
        (5, ClusterConfig(k=6), "between 1 and 5"),
        (5, ClusterConfig(k=0), "between 1 and 5"),
        (1, ClusterConfig(k=1), "at least 2"),
        (5, ClusterConfig(method="mbcc", k=2), "did you mean: mbc"),
        (5, ClusterConfig(method="random", k=2, sizes=(3, 3)), "summing to 5"),
        (5, ClusterConfig(k=2, sparsity=1.5), "sparsity"),
    ],
)
def test_bad_requests_fail_before_reading(n, cfg, match):
    names = [f"e{i}" for i in range(n)]
    ctx = ClusterContext(names, {x: {} for x in names}, _NoRead())
    with pytest.raises(LorashelfError, match=match):
        cluster_experts(ctx, cfg)
