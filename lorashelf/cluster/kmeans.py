"""k-means with greedy k-means++ seeding and restarts, in torch, seeded and deterministic.

MBC runs k-means on the rows of the experts' similarity matrix (Ostapenko et al. 2024;
the reference uses scikit-learn's ``KMeans(init="k-means++", n_init=10)``). This is an
independent implementation of the same algorithm so scikit-learn is not a runtime
dependency: greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with 2 + ln k
candidate centres per step, keeping the one that lowers the potential most), Lloyd
iterations until the labels stop changing or the centres move less than ``tol`` times
the data's mean variance, ``n_init`` restarts and the lowest inertia wins. All random
draws come from one CPU generator seeded with ``seed``, so results are the same on any
device; the arithmetic runs on the input's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorashelf.errors import LorashelfError


@dataclass
class KMeansResult:
    labels: torch.Tensor  # [n] int64, on the input's device
    centers: torch.Tensor  # [k, m]
    inertia: float  # sum of squared distances of points to their centre
    n_iter: int  # Lloyd iterations of the winning restart


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[n, k] squared Euclidean distances between rows of ``x`` and rows of ``c``."""
    d = (x * x).sum(1)[:, None] - 2 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0)


def _draw(weights: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    w = weights.detach().double().cpu()
    if not torch.isfinite(w).all() or w.sum() <= 0:
        w = torch.ones_like(w)  # all points coincide with chosen centres
    return torch.multinomial(w, count, replacement=True, generator=gen)


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` seed points chosen by greedy k-means++."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = sq_distances(x, x[chosen])[:, 0]
    for _ in range(1, k):
        cand = _draw(closest, trials, gen).to(x.device)
        new = torch.minimum(closest[:, None], sq_distances(x, x[cand]))
        best = int(new.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = new[:, best]
    return torch.tensor(chosen, device=x.device)


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the point farthest from its centre, from a cluster of 2+."""
    counts = torch.bincount(labels, minlength=k)
    for c in torch.nonzero(counts == 0).flatten().tolist():
        own = dist.gather(1, labels[:, None])[:, 0].clone()
        own[counts[labels] < 2] = -1  # never empty another cluster
        i = int(own.argmax())
        counts[labels[i]] -= 1
        labels[i] = c
        counts[c] += 1
    return labels


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def lloyd(
    x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alternate assignment and mean steps from ``centers``; returns labels, centres, iters."""
    k = centers.shape[0]
    labels = None
    it = 0
    while it < max_iter:
        it += 1
        dist = sq_distances(x, centers)
        new_labels = _fill_empty(dist.argmin(1), dist, k)
        new_centers = _means(x, new_labels, k)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        if shift <= tol:
            break
    dist = sq_distances(x, centers)
    labels = _fill_empty(dist.argmin(1), dist, k)
    return labels, _means(x, labels, k), it


def inertia(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> float:
    return float(((x - centers[labels]) ** 2).sum())


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
) -> KMeansResult:
    """Cluster the rows of ``x`` [n, m] into ``k`` groups; best of ``n_init`` restarts."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise LorashelfError(f"k-means needs 1 <= k <= {n} points, got k={k}; pass a smaller k")
    if n_init < 1 or max_iter < 1:
        raise LorashelfError("k-means needs n_init >= 1 and max_iter >= 1")
    gen = torch.Generator().manual_seed(seed)
    tol_abs = tol * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    best: KMeansResult | None = None
    for _ in range(n_init):
        seeds = kmeans_plus_plus(x, k, gen)
        labels, centers, it = lloyd(x, x[seeds].clone(), max_iter, tol_abs)
        score = inertia(x, labels, centers)
        if best is None or score < best.inertia:
            best = KMeansResult(labels, centers, score, it)
    assert best is not None
    return best


def canonical_labels(labels: torch.Tensor | list[int]) -> list[int]:
    """Renumber clusters by first appearance (0, 1, ...): equal partitions, equal labels."""
    mapping: dict[int, int] = {}
    out = []
    for lab in [int(v) for v in labels]:
        mapping.setdefault(lab, len(mapping))
        out.append(mapping[lab])
    return out
