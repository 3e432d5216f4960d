"""How good a clustering is: agreement with another partition and similarity structure.

The adjusted Rand index (Hubert & Arabie 1985) compares two partitions of the same
items, 1.0 for identical ones and about 0 for chance agreement; it tells whether two
clusterings (MBC vs random, two seeds, a planted truth) agree. The similarity
statistics summarise what MBC optimises: the mean cosine similarity between experts
of one cluster against that between experts of different clusters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb
from typing import Any

import torch


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    """Adjusted Rand index of two labelings of the same items (1.0 = same partition)."""
    a, b = [int(v) for v in a], [int(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"labelings differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    pairs = sum(comb(c, 2) for c in Counter(zip(a, b)).values())
    rows = sum(comb(c, 2) for c in Counter(a).values())
    cols = sum(comb(c, 2) for c in Counter(b).values())
    total = comb(n, 2)
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    if top == expected:  # both partitions trivial (all singletons or one cluster)
        return 1.0
    return (pairs - expected) / (top - expected)


def similarity_stats(sim: torch.Tensor, labels: Sequence[int]) -> dict[str, Any]:
    """Mean intra-/inter-cluster similarity (off-diagonal pairs) overall and per cluster.

    A cluster of one expert has no intra-cluster pair: its mean is None, and it is left
    out of the overall intra mean.
    """
    lab = torch.as_tensor([int(v) for v in labels], device=sim.device)
    s = sim.double()
    same = lab[:, None] == lab[None, :]
    off = ~torch.eye(len(lab), dtype=torch.bool, device=sim.device)
    intra, inter = same & off, ~same
    k = int(lab.max()) + 1 if len(lab) else 0
    per = []
    for c in range(k):
        m = lab == c
        block = s[m][:, m]
        size = int(m.sum())
        mean = (
            float((block.sum() - block.diagonal().sum()) / (size * (size - 1)))
            if size > 1
            else None
        )
        per.append({"size": size, "mean_intra_cosine": mean})
    return {
        "mean_intra_cosine": float(s[intra].mean()) if intra.any() else None,
        "mean_inter_cosine": float(s[inter].mean()) if inter.any() else None,
        "sizes": [p["size"] for p in per],
        "clusters": per,
    }
