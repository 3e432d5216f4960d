"""Retrain one expert per cluster: the last step of MBC (Ostapenko et al. 2024).

After clustering the private experts, MBC trains a fresh LoRA expert per cluster on the
union of its tasks' data. Each built expert's card records its member tasks and where
it came from: ``extra.cluster = {id, members, config, file, sha256}`` (the clustering
config and the clusters.json content hash). Building is resumable: a cluster whose
expert is already in the output library, built from the same clusters.json, is
skipped; one built from a different clustering is refused rather than mixed in.

Training itself is the train area's job; :func:`build_library` takes a ``Trainer``
(jobs in, PEFT dir out) and :func:`lorashelf.jobs.run_jobs` does the resumable loop, so
this module stays about clusters, names and cards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashelf.cluster.report import ClusterFile, load_clusters
from lorashelf.errors import LorashelfError
from lorashelf.jobs import Output, run_jobs


@dataclass(frozen=True)
class ClusterJob:
    """One expert to build: a cluster's id, the expert's name, its tasks and members."""

    id: int
    name: str
    tasks: tuple[str, ...]
    members: tuple[str, ...]


# Trains one expert on ``job.tasks`` and writes a PEFT adapter dir at the given path;
# returns card fields from training (e.g. init_seed, hyperparameters, base_model).
Trainer = Callable[[ClusterJob, Path], Mapping[str, Any]]


def plan_jobs(cf: ClusterFile, *, prefix: str = "cluster") -> list[ClusterJob]:
    """One job per cluster, named ``{prefix}_{id:02d}``; clusters without tasks refused."""
    jobs = []
    width = max(2, len(str(len(cf.clusters) - 1)))
    for c in cf.clusters:
        if not c["tasks"]:
            raise LorashelfError(
                f"cluster {c['id']} of {cf.path} lists no tasks (its experts' cards record none), "
                "so there is nothing to train it on; re-add those experts with their tasks"
            )
        name = f"{prefix}_{int(c['id']):0{width}d}"
        jobs.append(ClusterJob(int(c["id"]), name, tuple(c["tasks"]), tuple(c["experts"])))
    return jobs


def cluster_extra(job: ClusterJob, cf: ClusterFile) -> dict[str, Any]:
    """The ``extra.cluster`` record of a built expert's card."""
    return {
        "id": job.id,
        "members": list(job.members),
        "config": cf.config,
        "file": str(cf.path.resolve()),
        "sha256": cf.sha256,
    }


def check_members(cf: ClusterFile, names: Sequence[str], source: str | os.PathLike[str]) -> None:
    """Every clustered expert must exist in the source library (same library, same names)."""
    have = set(names)
    missing = [e for c in cf.clusters for e in c["experts"] if e not in have]
    if missing:
        raise LorashelfError(
            f"{cf.path} lists expert {missing[0]!r} ({len(missing)} in all) that is not in {source}; "
            f"pass the library it was made from, or recluster with `lorashelf cluster {source}`"
        )


def check_built(jobs: Sequence[ClusterJob], out_lib: Any, cf: ClusterFile) -> None:
    """Refuse an output library holding one of these experts built from another clustering."""
    have = set(out_lib.names())
    for job in (j for j in jobs if j.name in have):
        made = (out_lib.get(job.name).card.get("extra") or {}).get("cluster") or {}
        if made.get("sha256") != cf.sha256:
            raise LorashelfError(
                f"the output library already holds {job.name!r}, built from another clustering "
                f"(sha256 {str(made.get('sha256'))[:12]} vs {cf.sha256[:12]}); "
                "build into a new --library directory or remove that expert"
            )


def build_library(
    clusters: str | os.PathLike[str],
    source_lib: Any,
    out_lib: Any,
    trainer: Trainer,
    *,
    prefix: str = "cluster",
    progress: bool = False,
) -> list[str]:
    """Train and add one expert per cluster of ``clusters`` to ``out_lib``; names built.

    ``source_lib`` is the library that was clustered (checked to hold every member);
    clusters already built from the same file are skipped, so a rerun resumes.
    """
    cf = load_clusters(clusters)
    check_members(cf, list(source_lib.names()), getattr(source_lib, "path", "the library"))
    jobs = plan_jobs(cf, prefix=prefix)
    check_built(jobs, out_lib, cf)

    def work(job: ClusterJob, out_dir: Path) -> Output[str]:
        fields = dict(trainer(job, out_dir))
        extra = dict(fields.pop("extra", None) or {})
        extra["cluster"] = cluster_extra(job, cf)
        return Output({**fields, "tasks": list(job.tasks), "extra": extra}, job.name)

    built = run_jobs(jobs, work, out_lib, desc="building cluster experts", progress=progress)
    return list(built.values())


def training_from_cards(cards: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The training options the source experts share (their cards' ``training``), or {}.

    Cluster experts are then trained like the private ones (same rank, init seed, ...).
    """
    seen = {json.dumps(c["training"], sort_keys=True) for c in cards.values() if c.get("training")}
    if len(seen) > 1:
        first, *rest = (json.loads(s) for s in sorted(seen))
        diff = sorted(k for r in rest for k in set(first) | set(r) if first.get(k) != r.get(k))
        raise LorashelfError(
            f"the source experts were trained with different settings ({', '.join(diff[:4])} "
            "differ); choose the cluster experts' with --train-config FILE and/or --set KEY=VALUE"
        )
    return json.loads(seen.pop()) if seen else {}


def make_trainer(
    base_model: str,
    train_cfg: Any,
    *,
    home: Path,
    device: Any,
    dtype: Any,
    progress: bool = True,
) -> Trainer:
    """The default Trainer: one joint LoRA run (``train_expert``) over a cluster's tasks.

    The base model is loaded on first use and reused: ``train_expert`` restores it.
    """
    loaded: list[Any] = []

    def train(job: ClusterJob, out_dir: Path) -> Mapping[str, Any]:
        from lorashelf.data import load_task
        from lorashelf.models import load_base
        from lorashelf.train.trainer import train_expert

        tasks = [load_task(t, home=home) for t in job.tasks]
        if not loaded:
            loaded.append(load_base(base_model, home=home, dtype=dtype, device=device))
        result = train_expert(loaded[0], tasks, train_cfg, out_dir=out_dir, progress=progress)
        return result.card()

    return train
