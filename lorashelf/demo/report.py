"""Assemble the demo's report from what its stages wrote: results JSON, library cards
(loss curves, cluster members), the similarity and routing heatmaps, LoraHub weights.

Nothing in the report is typed in: every number is read from this run's files.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from lorashelf.demo.pipeline import (
    EVALS,
    FEWSHOT_NAMES,
    GENERAL_LIBRARY,
    Demo,
    fewshot_methods,
    gks_rows,
    more_methods,
)
from lorashelf.demo.sentences import Row, methods_text
from lorashelf.evaluate.plots import loss_curves, method_bars, weight_heatmap
from lorashelf.evaluate.report import Report, Section, write_report
from lorashelf.evaluate.runner import EvalResult, result_from_json
from lorashelf.library import Library


def collect_rows(demo: Demo) -> list[Row]:
    """Every result the stages wrote, in the report's order: the methods of Ostapenko et
    al., every other merge and router, the best-expert baselines, the few-shot methods."""
    planned = [(label, lib, m) for label, lib, m in EVALS]
    planned += [(label, "private", m) for label, m in more_methods(demo.suite)]
    planned += [(label, GENERAL_LIBRARY, f"gks:{v}") for label, v in gks_rows(demo.suite)]
    rows = []
    for label, lib, method in planned:
        path = demo.results_file(label)
        if path.exists():
            result = result_from_json(json.loads(path.read_text()), method=label)
            rows.append(Row(label, method, lib, result))
    s = demo.suite
    for name in fewshot_methods(s):
        path = demo.fewshot_file(name)
        entries = {e.get("method"): e for e in _json(path).get("methods", [])}
        if name in entries:
            draws = f"mean of {s.seeds} seeds" if s.seeds > 1 else "one draw of shots"
            label = f"{FEWSHOT_NAMES.get(name, name)} {s.shots}-shot ({draws})"
            result = result_from_json(entries[name], method=label)
            rows.append(Row(label, f"fewshot:{name}", "private", result))
    return rows


def collect_results(demo: Demo) -> list[EvalResult]:
    return [row.result for row in collect_rows(demo)]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _curves(lib_dir: Path) -> dict[str, list[float]]:
    if not (lib_dir / "library.json").exists():
        return {}
    lib = Library.open(lib_dir)
    out = {}
    for name in lib.names():
        curve = (lib.get(name).card.get("extra") or {}).get("loss_curve") or []
        out[name] = [float(x) for x in curve]
    return out


def _cluster_text(demo: Demo) -> str:
    path = demo.out / "clusters.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    lines = []
    for c in data.get("clusters", []):
        members = c.get("tasks") or c.get("experts") or c.get("members") or []
        lines.append(f"cluster {c.get('id')}: {', '.join(map(str, members))}")
    return "\n\n".join(lines)


def _lorahub_weights(demo: Demo) -> tuple[list[str], list[str], list[list[float]]] | None:
    # {task: {expert: mean weight}}
    weights = _json(demo.fewshot_file("lorahub")).get("lorahub_weights")
    if not weights:
        return None
    tasks = list(weights)
    experts = sorted({e for w in weights.values() for e in w})
    return tasks, experts, [[weights[t].get(e, 0.0) for e in experts] for t in tasks]


def build_report(demo: Demo, command: str, versions: dict[str, str]) -> tuple[Path, Path]:
    rows = collect_rows(demo)
    results = [row.result for row in rows]
    fig = demo.out / "figures"
    fig.mkdir(exist_ok=True)
    sections = [
        Section("Methods", text=methods_text(rows, demo.suite.eval_limit)),
        Section("Averages over held-out tasks", image=method_bars(results, fig / "methods.png")),
    ]
    curves = {
        **_curves(demo.out / "private"),
        **_curves(demo.out / "shared"),
        **_curves(demo.out / "mbc"),
    }
    if curves:
        sections.append(Section("Training loss", text="Private experts, the shared expert and the MBC cluster experts.",
                                image=loss_curves(curves, fig / "loss.png")))  # fmt: skip
    if (demo.out / "similarity.png").exists():
        sections.append(
            Section(
                "Expert similarity (MBC)",
                text=_cluster_text(demo),
                image=demo.out / "similarity.png",
            )
        )
    for lib in ("private", "mbc"):
        png = demo.out / f"routing-{lib}.png"
        if png.exists():
            sections.append(
                Section(
                    f"Arrow routing ({lib} library)",
                    text="Mean routing weight each expert received on each held-out task.",
                    image=png,
                )
            )
    lh = _lorahub_weights(demo)
    if lh:
        tasks, experts, vals = lh
        sections.append(Section("LoraHub weights", text="Mean composition weight per expert (over seeds).",
                                image=weight_heatmap(tasks, experts, vals, fig / "lorahub.png")))  # fmt: skip
    intro = (
        f"Suite {demo.suite.name!r}: {demo.suite.description} Training tasks: {len(demo.suite.train)}; "
        f"held-out tasks: {len(demo.suite.heldout)} ({demo.suite.eval_limit} test examples each). "
        f"Machine: {platform.processor() or platform.machine()}, accuracy and gold NLL from this run."
    )
    report = Report(title="lorashelf demo report", intro=intro, results=results, sections=sections,
                    command=command, versions=versions, timings=demo.all_runs or demo.timings,
                    timings_note=(f"Summed over the {demo.runs} runs into this directory (a stopped "
                                  "run resumes; finished work is not redone)."
                                  if demo.runs > 1 else ""),
                    methods_in_rows=True)  # fmt: skip
    return write_report(report, demo.out)
