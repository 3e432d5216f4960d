"""clusters.json and the similarity heatmap: what ``lorashelf cluster`` writes.

clusters.json lists each cluster's experts and the union of their tasks, the
similarity statistics (mean intra-/inter-cluster cosine, sizes) and the config that
produced it, so ``lorashelf build`` can train one expert per cluster and record which
clustering it came from (by the file's sha256). The heatmap shows the similarity
matrix with experts ordered by cluster and lines at the cluster boundaries. Both are
written only when everything succeeded: the PNG is rendered to a temporary file and
renamed after the JSON is in place, so a failure leaves neither half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorashelf.cluster.methods import Clustering
from lorashelf.config import to_dict, write_json_atomic
from lorashelf.errors import LorashelfError

FORMAT = "lorashelf-clusters/1"


def _tasks_of(card: Mapping[str, Any]) -> list[str]:
    return [str(t) for t in (card.get("tasks") or [])]


def clustering_to_json(
    c: Clustering, cards: Mapping[str, Mapping[str, Any]], *, source: Mapping[str, Any]
) -> dict[str, Any]:
    """The clusters.json document of clustering ``c`` of the experts described by ``cards``."""
    clusters = []
    for i, members in enumerate(c.members()):
        tasks = list(dict.fromkeys(t for m in members for t in _tasks_of(cards.get(m, {}))))
        clusters.append(
            {
                "id": i,
                "size": len(members),
                "mean_intra_cosine": c.stats["clusters"][i]["mean_intra_cosine"],
                "experts": members,
                "tasks": tasks,
            }
        )
    return {
        "format": FORMAT,
        "method": c.config.method,
        "k": len(clusters),
        "source": dict(source),
        "similarity": c.similarity_kind,
        "stats": {key: c.stats[key] for key in ("mean_intra_cosine", "mean_inter_cosine", "sizes")},
        "info": c.info,
        "clusters": clusters,
        "config": to_dict(c.config),
    }


def short_names(names: Sequence[str]) -> tuple[list[str], str]:
    """Names without the prefix (up to a ``__`` or ``/``) that all of them share."""
    names = [str(n) for n in names]
    if len(names) < 2:
        return names, ""
    common = os.path.commonprefix(names)
    cut = max(common.rfind("__") + 2 if "__" in common else 0, common.rfind("/") + 1)
    if cut <= 0 or any(len(n) <= cut for n in names):
        return names, ""
    return [n[cut:] for n in names], common[:cut]


def plot_similarity(
    sim: torch.Tensor,
    names: Sequence[str],
    labels: Sequence[int],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    max_tick_labels: int = 80,
) -> None:
    """Heatmap of ``sim`` ordered by cluster, with cluster boundaries; PNG at ``path``.

    The figure is sized from the number of experts and the length of their names, so
    labels never overlap or get cut; up to 24 experts the cells show their values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = sorted(range(len(names)), key=lambda i: (labels[i], i))
    m = sim.double().cpu()[order][:, order].numpy()
    n = len(order)
    off = m[~torch.eye(n, dtype=torch.bool).numpy()]
    lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    shown, prefix = short_names(names)
    named = n <= max_tick_labels
    font = max(5.0, min(9.0, 400.0 / n)) if named else 7.0
    longest = max((len(shown[i]) for i in order), default=4) + 5 if named else 4
    label_in = 0.6 * font / 72 * longest + 0.3  # about 0.6 em per character
    cell = max(0.12, min(0.45, 14.0 / n))
    side = n * cell
    fig = Figure(figsize=(side + label_in + 1.8, side + label_in + 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    sizes = [sum(1 for lab in labels if lab == c) for c in range(max(labels) + 1)]
    edges = [sum(sizes[: c + 1]) - 0.5 for c in range(len(sizes) - 1)]
    for e in edges:
        ax.axhline(e, color="white", linewidth=1.5)
        ax.axvline(e, color="white", linewidth=1.5)
    if named:
        ticks = [f"{shown[i]} (c{labels[i]})" for i in order]
        ax.set_xticks(range(n), ticks, rotation=90, fontsize=font)
        ax.set_yticks(range(n), ticks, fontsize=font)
    else:  # too many experts to name: label the clusters instead
        centers = [sum(sizes[:c]) + sizes[c] / 2 - 0.5 for c in range(len(sizes))]
        ax.set_xticks(centers, [f"c{c}" for c in range(len(sizes))], rotation=90, fontsize=7)
        ax.set_yticks(centers, [f"c{c}" for c in range(len(sizes))], fontsize=7)
    if n <= 24:
        mid = (lo + hi) / 2
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                            color="k" if m[i, j] > mid else "w")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    head = title or f"{n} experts, {len(sizes)} clusters"
    if prefix:
        head += f"\n(names without the shared prefix {prefix!r})"
    ax.set_title(head, fontsize=9)
    fig.savefig(path, dpi=120, format="png", bbox_inches="tight")


def write_outputs(
    doc: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    plot: str | os.PathLike[str] | None = None,
    clustering: Clustering | None = None,
) -> None:
    """Write clusters.json (and the heatmap) all-or-nothing."""
    tmp_png = None
    try:
        if plot is not None:
            assert clustering is not None
            Path(plot).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_png = tempfile.mkstemp(dir=Path(plot).parent, prefix=".plot.", suffix=".png")
            os.close(fd)
            kind = {"parameter": "LoRA-parameter", "text": "prompt-embedding"}
            title = (
                f"{doc['method']}: {len(clustering.names)} experts, k={doc['k']} "
                f"({kind.get(doc['similarity'], doc['similarity'])} cosine)"
            )
            plot_similarity(
                clustering.similarity, clustering.names, clustering.labels, tmp_png, title=title
            )
        write_json_atomic(out, doc)
        if tmp_png is not None:
            os.replace(tmp_png, plot)  # type: ignore[arg-type]
            tmp_png = None
    finally:
        if tmp_png is not None and os.path.exists(tmp_png):
            os.unlink(tmp_png)


@dataclass(frozen=True)
class ClusterFile:
    """A parsed clusters.json: its clusters, config and content hash."""

    path: Path
    clusters: list[dict[str, Any]]
    config: dict[str, Any]
    sha256: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(c["experts"]) for c in self.clusters)


def load_clusters(path: str | os.PathLike[str]) -> ClusterFile:
    """Read and check a clusters.json written by ``lorashelf cluster``."""
    path = Path(path)
    if not path.is_file():
        raise LorashelfError(
            f"no clusters file at {path}; create one with `lorashelf cluster DIR --k K --out {path}`"
        )
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LorashelfError(
            f"{path} is not valid JSON ({e}); recreate it with `lorashelf cluster`"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != FORMAT
        or not isinstance(doc.get("clusters"), list)
    ):
        raise LorashelfError(
            f"{path} is not a lorashelf clusters file (format {FORMAT}); recreate it with `lorashelf cluster`"
        )
    for c in doc["clusters"]:
        if not isinstance(c, dict) or not {"id", "experts", "tasks"} <= set(c):
            raise LorashelfError(
                f"{path}: every cluster needs id, experts and tasks; recreate it with `lorashelf cluster`"
            )
    return ClusterFile(
        path, doc["clusters"], doc.get("config", {}), hashlib.sha256(raw).hexdigest()
    )
