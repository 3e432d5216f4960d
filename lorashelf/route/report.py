"""The routing report: which experts each task's tokens were sent to.

``save_routing_report`` writes a JSON file with, for every task, the mean routing
weight each expert received overall, per transformer block and per module (padding
excluded; see lorashelf.route.stats), and a heatmap PNG of tasks x experts (overall
means) beside it. As in Ostapenko et al. 2024 (arXiv 2405.11157, the routing
analyses), a good router sends a held-in task mostly to its own expert, which shows
as a bright diagonal when tasks and experts share an order. The PNG is rendered to
a temporary file and renamed after the JSON is in place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.errors import LorashelfError
from lorashelf.route.stats import RoutingStats

FORMAT = "lorashelf-routing/1"


def routing_report(
    stats_by_task: Mapping[str, RoutingStats | Mapping[str, Any]],
    *,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report document; every task must have been routed over the same experts."""
    if not stats_by_task:
        raise LorashelfError("no routing statistics to report; evaluate at least one task")
    tasks = {
        t: s.to_dict() if isinstance(s, RoutingStats) else dict(s) for t, s in stats_by_task.items()
    }
    experts = next(iter(tasks.values()))["experts"]
    for t, d in tasks.items():
        if list(d["experts"]) != list(experts):
            raise LorashelfError(f"task {t!r} was routed over other experts than the first task")
    return {
        "format": FORMAT,
        "experts": list(experts),
        "tasks": {t: {k: v for k, v in d.items() if k != "experts"} for t, d in tasks.items()},
        "config": dict(config or {}),
    }


def plot_routing(
    report: Mapping[str, Any], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """Heatmap of tasks x experts (mean routing weight) as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experts, tasks = report["experts"], list(report["tasks"])
    m = [report["tasks"][t]["overall"] for t in tasks]
    # long task and expert names need room: size the figure from the label lengths
    label_in = 0.075 * max((len(str(n)) for n in [*experts, *tasks]), default=10)
    width = max(5.0, 0.55 * len(experts) + label_in + 2.0)
    height = max(3.0, 0.45 * len(tasks) + label_in + 1.5)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="mean routing weight", shrink=0.8)
    if len(tasks) * len(experts) <= 400:
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if v < 0.5 * max(map(max, m)) else "k",
                )
    if len(experts) <= 80:
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
    if len(tasks) <= 80:
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("task")
    ax.set_title(title or "routing: tasks x experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")


def save_routing_report(
    stats_by_task: Mapping[str, RoutingStats | Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    title: str = "",
) -> tuple[Path, Path]:
    """Write ``out_path`` (JSON; ``.json`` added if missing) and the heatmap beside it (.png)."""
    out = Path(out_path)
    json_path = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    png_path = json_path.with_suffix(".png")
    report = routing_report(stats_by_task, config=config)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=json_path.parent, prefix=f".{png_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        plot_routing(report, tmp, title=title)
        write_json_atomic(json_path, report)
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return json_path, png_path
