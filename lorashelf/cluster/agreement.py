"""Does a clustering recover known structure? ARI against family labels, over seeds.

MBC's claim (Ostapenko et al. 2024, arXiv 2405.11157) is that experts of related tasks
have similar LoRA parameters. The check: a library whose tasks come in known families
(e.g. BIG-bench's ``arithmetic/*``, ``logical_deduction/*`` subtasks) is clustered by
each method with several seeds, and each partition is scored by its adjusted Rand
index against the families. ``random`` draws clusters of the sizes ``mbc`` found with
the same seed (the paper's baseline), or balanced sizes when ``mbc`` is not compared.
All methods share one :class:`ClusterContext`, so the similarity matrices (and the
text embeddings) are computed once however many seeds run.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lorashelf.cluster.methods import ClusterConfig, ClusterContext, cluster_experts
from lorashelf.cluster.metrics import adjusted_rand_index
from lorashelf.errors import LorashelfError


@dataclass(frozen=True)
class Truth:
    """Family label per expert; experts whose tasks are in no family are singletons."""

    names: list[str]
    labels: list[int]
    families: list[str]  # family name per label
    singletons: list[str]  # experts that got a family of their own


def family_truth(
    names: Sequence[str], cards: Mapping[str, Mapping[str, Any]], families: Mapping[str, Any]
) -> Truth:
    """Label each expert by the family of its tasks (``families``: name -> task ids).

    An expert trained on tasks of two families is ambiguous and refused; an expert whose
    tasks are in no family is its own family (an "unrelated" task).
    """
    if not families:
        raise LorashelfError(
            "the families file lists no families; give a JSON object "
            '{"family": ["bigbench:task/a", ...], ...} or a suite with a "families" key'
        )
    of_task: dict[str, str] = {}
    for fam, tasks in families.items():
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise LorashelfError(f"family {fam!r} must list task ids, got {tasks!r}")
        for t in tasks:
            if t in of_task and of_task[t] != fam:
                raise LorashelfError(f"task {t!r} is in two families: {of_task[t]!r}, {fam!r}")
            of_task[t] = fam
    ids: dict[str, int] = {}
    labels, singletons = [], []
    for name in names:
        tasks = list(cards[name].get("tasks") or [])
        fams = sorted({of_task[t] for t in tasks if t in of_task})
        if len(fams) > 1:
            raise LorashelfError(
                f"expert {name!r} was trained on tasks of families {fams}; "
                "the check needs one family per expert (drop it or merge the families)"
            )
        if fams:
            fam = fams[0]
        else:
            fam = f"{name} (alone)"
            singletons.append(name)
        labels.append(ids.setdefault(fam, len(ids)))
    if len(ids) < 2:
        raise LorashelfError(
            "every expert is in one family, so any clustering agrees trivially; "
            "list at least two families"
        )
    return Truth(list(names), labels, sorted(ids, key=ids.get), singletons)


def agreement(
    ctx: ClusterContext,
    truth: Truth,
    base: ClusterConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """One row per (method, seed): ARI against ``truth`` and the clustering's statistics."""
    if list(ctx.names) != truth.names:
        raise LorashelfError("the truth labels are for other experts than the context's")
    rows = []
    for seed in seeds:
        mbc_sizes = None
        for method in methods:
            cfg = replace(base, method=method, seed=seed)
            if method == "random":
                cfg = replace(cfg, sizes=mbc_sizes)
            c = cluster_experts(ctx, cfg)
            if method == "mbc":
                mbc_sizes = tuple(c.stats["sizes"])
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "ari": adjusted_rand_index(c.labels, truth.labels),
                    "labels": list(c.labels),
                    "sizes": c.stats["sizes"],
                    "mean_intra_cosine": c.stats["mean_intra_cosine"],
                    "mean_inter_cosine": c.stats["mean_inter_cosine"],
                }
            )
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean, standard deviation, min and max ARI over its seeds (input order)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(float(r["ari"]))
    return [
        {
            "method": m,
            "seeds": len(v),
            "ari_mean": statistics.fmean(v),
            "ari_std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "ari_min": min(v),
            "ari_max": max(v),
        }
        for m, v in by.items()
    ]
