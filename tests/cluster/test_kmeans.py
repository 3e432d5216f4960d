"""Our k-means and ARI against scikit-learn (a test-only dependency)."""

from __future__ import annotations

import pytest
import torch

from lorashelf.cluster.kmeans import canonical_labels, kmeans
from lorashelf.cluster.metrics import adjusted_rand_index, similarity_stats
from lorashelf.errors import LorashelfError

sk_cluster = pytest.importorskip("sklearn.cluster")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _blobs(n_per: int, k: int, m: int, spread: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, m, generator=g, dtype=torch.float64) * 5
    x = torch.cat(
        [c + spread * torch.randn(n_per, m, generator=g, dtype=torch.float64) for c in centers]
    )
    return x, [c for c in range(k) for _ in range(n_per)]


@pytest.mark.parametrize(
    "n_per,k,m,spread,seed",
    [(20, 4, 8, 0.5, 0), (30, 6, 3, 3.0, 1), (10, 10, 20, 4.0, 2), (50, 3, 2, 10.0, 3)],
)
def test_inertia_matches_sklearn(n_per, k, m, spread, seed):
    x, _ = _blobs(n_per, k, m, spread, seed)
    ours = kmeans(x, k, n_init=10, seed=seed)
    ref = sk_cluster.KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit(
        x.numpy()
    )
    assert ours.inertia <= ref.inertia_ * (1 + 1e-3)
    # the reported inertia is the one of the returned labels and centres
    recomputed = float(((x - ours.centers[ours.labels]) ** 2).sum())
    assert ours.inertia == pytest.approx(recomputed, rel=1e-9)
    # centres are the means of their points
    for c in range(k):
        torch.testing.assert_close(ours.centers[c], x[ours.labels == c].mean(0))


def test_recovers_separated_blobs_like_sklearn():
    x, truth = _blobs(15, 5, 6, 0.3, 7)
    ours = kmeans(x, 5, seed=0).labels.tolist()
    ref = sk_cluster.KMeans(n_clusters=5, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_index(ours, truth) == 1.0
    assert adjusted_rand_index(ours, ref.tolist()) == 1.0


def test_deterministic_per_seed():
    x, _ = _blobs(20, 4, 5, 4.0, 0)
    a, b = kmeans(x, 4, seed=3, n_init=2), kmeans(x, 4, seed=3, n_init=2)
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    runs = {tuple(canonical_labels(kmeans(x, 4, seed=s, n_init=1).labels)) for s in range(6)}
    assert len(runs) > 1  # the seed matters on overlapping blobs with one restart


def test_no_empty_clusters_with_duplicate_points():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 2, dtype=torch.float64)
    res = kmeans(x, 4, seed=0)
    assert sorted(torch.bincount(res.labels, minlength=4).tolist())[0] >= 1


def test_k_out_of_range():
    x = torch.randn(3, 2)
    with pytest.raises(LorashelfError, match="smaller k"):
        kmeans(x, 4)


@pytest.mark.parametrize("seed", range(5))
def test_ari_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (40,), generator=g).tolist()
    b = torch.randint(0, 3 + seed % 3, (40,), generator=g).tolist()
    assert adjusted_rand_index(a, b) == pytest.approx(
        sk_metrics.adjusted_rand_score(a, b), abs=1e-12
    )
    assert adjusted_rand_index(a, a) == 1.0
    perm = {0: 2, 1: 0, 2: 3, 3: 1}
    assert adjusted_rand_index(a, [perm[v] for v in a]) == 1.0


def test_similarity_stats_against_loops():
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    sim, labels = e @ e.T, [0, 1, 0, 2, 1, 0, 1, 1, 0]
    st = similarity_stats(sim, labels)
    intra = [sim[i, j] for i in range(9) for j in range(9) if i != j and labels[i] == labels[j]]
    inter = [sim[i, j] for i in range(9) for j in range(9) if labels[i] != labels[j]]
    assert st["mean_intra_cosine"] == pytest.approx(float(sum(intra) / len(intra)))
    assert st["mean_inter_cosine"] == pytest.approx(float(sum(inter) / len(inter)))
    assert st["sizes"] == [4, 4, 1] and st["clusters"][2]["mean_intra_cosine"] is None
