"""Reports a person would rather look at than read: ``report.md`` and a self-contained
``report.html`` (images embedded as base64) from evaluation results and figures.

Tables put tasks in rows and methods in columns, one table per metric, with the best
value of each row in bold (highest accuracy, lowest gold NLL), and a mean row; with
``methods_in_rows`` (many methods, few tasks, as in the demo) methods are the rows,
tasks and the mean the columns, and the best of each column is in bold.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorashelf.evaluate.runner import EvalResult
from lorashelf.evaluate.stats import interval_table


@dataclass
class Section:
    heading: str
    text: str = ""  # plain paragraphs (blank-line separated)
    image: Path | None = None
    table: list[list[str]] | None = None  # first row is the header


@dataclass
class Report:
    title: str
    intro: str
    results: Sequence[EvalResult]
    sections: list[Section] = field(default_factory=list)
    command: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    timings_note: str = ""  # e.g. that the times add up several resumed runs
    methods_in_rows: bool = False


def metric_table(
    results: Sequence[EvalResult], metric: str, methods_in_rows: bool = False
) -> list[list[str]]:
    """Rows: tasks (+ mean); columns: methods; best per row marked with ``**``
    (``methods_in_rows``: the transpose, best per column)."""
    if methods_in_rows:
        cols = [list(col) for col in zip(*metric_table(results, metric))]
        cols[0][0] = "method"
        return cols
    tasks = list(dict.fromkeys(t for r in results for t in r.tasks))
    pick = max if metric == "accuracy" else min
    rows = [["task", *[r.method for r in results]]]

    def row(label: str, vals: list[float | None]) -> list[str]:
        present = [v for v in vals if v is not None]
        best = pick(present) if present else None
        cells = [
            "-" if v is None else (f"**{v:.3f}**" if v == best and len(present) > 1 else f"{v:.3f}")
            for v in vals
        ]
        return [label, *cells]

    for t in tasks:
        rows.append(
            row(t, [getattr(r.tasks[t], metric) if t in r.tasks else None for r in results])
        )
    means = [r.mean_accuracy if metric == "accuracy" else r.mean_nll for r in results]
    rows.append(row("mean", means))
    return rows


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    def cell(tag: str, v: str) -> str:
        bold = v.startswith("**") and v.endswith("**")
        text = html.escape(v.strip("*"))
        return f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>"

    head = "".join(cell("th", c) for c in rows[0])
    body = "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sections(report: Report) -> list[Section]:
    head = [
        Section(
            "Accuracy (held-out tasks)",
            table=metric_table(report.results, "accuracy", report.methods_in_rows),
        ),
        Section(
            "Gold NLL per token (lower is better)",
            table=metric_table(report.results, "nll", report.methods_in_rows),
        ),
    ]
    intervals = interval_table(report.results, baseline="base")
    if intervals:
        head.append(Section(
            "Mean over held-out tasks, with 95% bootstrap intervals",
            text="Tasks resampled, then examples within each task; sorted by gold NLL. The last "
            "column is the mean per-example NLL difference to the base model on the same "
            "examples, with a two-sided sign-flip permutation test.",
            table=intervals,
        ))  # fmt: skip
    tail = []
    if report.timings:
        rows = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in report.timings.items()]
        rows.append(["total", f"{sum(report.timings.values()):.1f}"])
        tail.append(Section("Wall time per stage", text=report.timings_note, table=rows))
    if report.command or report.versions:
        text = f"Command: `{report.command}`" if report.command else ""
        rows = [["package", "version"]] + [[k, v] for k, v in report.versions.items()]
        tail.append(Section("How this report was made", text=text, table=rows))
    return head + list(report.sections) + tail


def render_markdown(report: Report, image_dir: Path) -> str:
    parts = [f"# {report.title}\n", report.intro.strip() + "\n"]
    for s in _sections(report):
        parts.append(f"\n## {s.heading}\n")
        if s.text:
            parts.append(s.text.strip() + "\n")
        if s.table:
            parts.append(_md_table(s.table) + "\n")
        if s.image:
            parts.append(f"![{s.heading}]({os.path.relpath(s.image, image_dir)})\n")
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f0f4f8}tr:last-child{background:#fafafa}
img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:1px 4px}"""


def render_html(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1>"]  # fmt: skip
    parts += [f"<p>{html.escape(p)}</p>" for p in report.intro.strip().split("\n\n")]
    for s in _sections(report):
        parts.append(f"<h2>{html.escape(s.heading)}</h2>")
        for para in s.text.strip().split("\n\n") if s.text else []:
            parts.append(f"<p>{html.escape(para).replace('`', '')}</p>")
        if s.table:
            parts.append(_html_table(s.table))
        if s.image and Path(s.image).exists():
            data = base64.b64encode(Path(s.image).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(s.heading)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    _write_atomic(md, render_markdown(report, out_dir))
    _write_atomic(page, render_html(report))
    return md, page
