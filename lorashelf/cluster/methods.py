"""Clusterers: ``mbc`` (Ostapenko et al. 2024), the ``random`` baseline, ``embedding``.

* ``mbc``: k-means on the rows of the experts' parameter cosine-similarity matrix, as
  the paper's Model-Based Clustering (similar LoRA weights -> similar tasks).
* ``random``: a uniformly random partition with given cluster sizes (balanced, or those
  of another clustering), the paper's baseline for "does the grouping matter".
* ``embedding``: a data-based alternative: each expert is the mean of the base model's
  mean-pooled last hidden states over up to N of its tasks' training prompts, then
  k-means on the rows of their cosine-similarity matrix.

Every clusterer is ``fn(ctx, cfg) -> Outcome`` registered in ``CLUSTERERS``; it asks the
:class:`ClusterContext` for what it needs (each similarity is computed at most once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorashelf.cluster.embed import FactorLoader, check_init_seeds
from lorashelf.cluster.kmeans import canonical_labels, kmeans
from lorashelf.cluster.metrics import similarity_stats
from lorashelf.cluster.similarity import Similarity, SimilarityConfig, parameter_similarity
from lorashelf.errors import LorashelfError
from lorashelf.registry import Registry


@dataclass(frozen=True)
class ClusterConfig:
    """Everything that decides a clustering; written into clusters.json."""

    method: str = "mbc"
    k: int = 10
    seed: int = 0
    sparsity: float = 0.5  # mbc: zero this fraction of smallest-|w| entries per expert
    svd_dim: int | None = 64  # mbc: truncated-SVD dimension (None: full vectors)
    center: bool = False  # mbc: subtract the mean expert vector (the shared A init) first
    n_init: int = 10  # k-means restarts
    max_iter: int = 300  # k-means Lloyd iterations per restart
    sizes: tuple[int, ...] | None = None  # random: cluster sizes (None: balanced)
    max_prompts: int = 32  # embedding: training prompts per expert
    split_seed: int = 0  # embedding: which train split the prompts come from
    text_model: str | None = None  # embedding: model name (None: the library's base)
    allow_mixed_init: bool = False  # cluster experts of different LoRA init seeds


# Turns expert names into [n, h] L2-normalised text embeddings (see cluster/text.py).
TextEmbedder = Callable[[Sequence[str]], torch.Tensor]


class ClusterContext:
    """The experts to cluster and lazily computed, cached views of them."""

    def __init__(
        self,
        names: Sequence[str],
        cards: Mapping[str, Mapping[str, Any]],
        load: FactorLoader,
        *,
        device: torch.device | str = "cpu",
        block_size: int | None = None,
        block_mb: int = 512,
        text_embedder: TextEmbedder | None = None,
        progress: bool = False,
    ) -> None:
        self.names = list(names)
        self.cards = cards
        self.load = load
        self.device = device
        self.block_size, self.block_mb = block_size, block_mb
        self.text_embedder = text_embedder
        self.progress = progress
        self._cache: dict[Any, Any] = {}

    def parameter_similarity(self, cfg: ClusterConfig) -> Similarity:
        key = ("params", cfg.sparsity, cfg.svd_dim, cfg.center)
        if key not in self._cache:
            check_init_seeds(self.cards, allow_mixed=cfg.allow_mixed_init)
            scfg = SimilarityConfig(
                cfg.sparsity, cfg.svd_dim, self.block_size, self.block_mb, center=cfg.center
            )
            self._cache[key] = parameter_similarity(
                self.names, self.load, scfg, device=self.device, progress=self.progress
            )
        return self._cache[key]

    def text_similarity(self) -> torch.Tensor:
        if "text" not in self._cache:
            if self.text_embedder is None:
                raise LorashelfError("the embedding method needs a base model to embed prompts")
            emb = self.text_embedder(self.names).double().cpu()
            self._cache["text"] = (emb @ emb.T).clamp(-1.0, 1.0)
        return self._cache["text"]


@dataclass
class Outcome:
    labels: list[int]
    similarity: torch.Tensor  # [n, n], the one the stats and the heatmap show
    similarity_kind: str  # "parameter" or "text"
    info: dict[str, Any] = field(default_factory=dict)


Clusterer = Callable[[ClusterContext, ClusterConfig], Outcome]


def _kmeans_rows(sim: torch.Tensor, cfg: ClusterConfig) -> tuple[list[int], dict[str, Any]]:
    res = kmeans(sim, cfg.k, n_init=cfg.n_init, max_iter=cfg.max_iter, seed=cfg.seed)
    return res.labels.tolist(), {"kmeans_inertia": res.inertia}


def mbc(ctx: ClusterContext, cfg: ClusterConfig) -> Outcome:
    sim = ctx.parameter_similarity(cfg)
    labels, info = _kmeans_rows(sim.matrix, cfg)
    info.update({"param_dim": sim.dim, "svd_dim_used": sim.svd_dim, "svd_energy": sim.svd_energy})
    return Outcome(labels, sim.matrix, "parameter", info)


def balanced_sizes(n: int, k: int) -> tuple[int, ...]:
    """``k`` sizes summing to ``n`` that differ by at most one (larger ones first)."""
    return tuple(n // k + (1 if i < n % k else 0) for i in range(k))


def random_clusters(ctx: ClusterContext, cfg: ClusterConfig) -> Outcome:
    n = len(ctx.names)
    sizes = cfg.sizes or balanced_sizes(n, cfg.k)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    labels = [0] * n
    pos = 0
    for c, size in enumerate(sizes):
        for i in perm[pos : pos + size].tolist():
            labels[i] = c
        pos += size
    sim = ctx.parameter_similarity(cfg)  # only for the statistics and the heatmap
    return Outcome(labels, sim.matrix, "parameter", {"sizes_requested": list(sizes)})


def embedding_clusters(ctx: ClusterContext, cfg: ClusterConfig) -> Outcome:
    sim = ctx.text_similarity()
    labels, info = _kmeans_rows(sim, cfg)
    return Outcome(labels, sim, "text", info)


@dataclass
class Clustering:
    """A partition of ``names`` into clusters 0..k-1 and how it was made."""

    names: list[str]
    labels: list[int]
    similarity: torch.Tensor
    similarity_kind: str
    config: ClusterConfig
    stats: dict[str, Any]
    info: dict[str, Any]

    def members(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(max(self.labels) + 1)]
        for name, lab in zip(self.names, self.labels):
            out[lab].append(name)
        return out


def validate(n: int, cfg: ClusterConfig) -> None:
    """Reject impossible requests before any expert is read."""
    CLUSTERERS.get(cfg.method)
    if n < 2:
        raise LorashelfError(
            f"the library has {n} expert(s); clustering needs at least 2 "
            "(train more experts with `lorashelf train`)"
        )
    if not 1 <= cfg.k <= n:
        what = f"is more than the {n} experts to cluster" if cfg.k > n else "must be at least 1"
        raise LorashelfError(f"--k {cfg.k} {what}; pass --k between 1 and {n}")
    if cfg.sizes is not None and (
        len(cfg.sizes) != cfg.k or sum(cfg.sizes) != n or min(cfg.sizes) < 1
    ):
        raise LorashelfError(
            f"cluster sizes {list(cfg.sizes)} must be {cfg.k} positive numbers summing to {n} "
            "(the experts); take them from a clustering of this same library"
        )
    if cfg.n_init < 1 or cfg.max_iter < 1:
        raise LorashelfError("--n-init and --max-iter must be >= 1")
    SimilarityConfig(cfg.sparsity, cfg.svd_dim)  # range checks


def cluster_experts(ctx: ClusterContext, cfg: ClusterConfig) -> Clustering:
    """Run ``cfg.method`` on the experts of ``ctx``; labels numbered by first appearance."""
    validate(len(ctx.names), cfg)
    out = CLUSTERERS.get(cfg.method)(ctx, cfg)
    labels = canonical_labels(out.labels)
    stats = similarity_stats(out.similarity, labels)
    return Clustering(ctx.names, labels, out.similarity, out.similarity_kind, cfg, stats, out.info)


CLUSTERERS: Registry[Clusterer] = Registry(
    "clustering method", {"mbc": mbc, "random": random_clusters, "embedding": embedding_clusters}
)
