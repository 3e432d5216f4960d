"""Group a library's experts: MBC (Ostapenko et al. 2024), random and data baselines.

Parameter vectors (``embed``) -> blocked cosine similarity (``similarity``) -> k-means
(``kmeans``) on its rows, through registered clusterers (``methods``); clusters.json
and a heatmap (``report``); one retrained expert per cluster (``build``).
"""

from lorashelf.cluster.embed import check_init_seeds, flatten, layout_of, sparsify_
from lorashelf.cluster.kmeans import KMeansResult, canonical_labels, kmeans
from lorashelf.cluster.methods import (
    CLUSTERERS,
    ClusterConfig,
    ClusterContext,
    Clustering,
    balanced_sizes,
    cluster_experts,
)
from lorashelf.cluster.metrics import adjusted_rand_index, similarity_stats
from lorashelf.cluster.report import (
    ClusterFile,
    clustering_to_json,
    load_clusters,
    plot_similarity,
    write_outputs,
)
from lorashelf.cluster.similarity import (
    Similarity,
    SimilarityConfig,
    dense_similarity,
    gram_matrix,
    parameter_similarity,
)

__all__ = [
    "CLUSTERERS",
    "ClusterConfig",
    "ClusterContext",
    "ClusterFile",
    "Clustering",
    "KMeansResult",
    "Similarity",
    "SimilarityConfig",
    "adjusted_rand_index",
    "balanced_sizes",
    "canonical_labels",
    "check_init_seeds",
    "cluster_experts",
    "clustering_to_json",
    "dense_similarity",
    "flatten",
    "gram_matrix",
    "kmeans",
    "layout_of",
    "load_clusters",
    "parameter_similarity",
    "plot_similarity",
    "similarity_stats",
    "sparsify_",
    "write_outputs",
]
