"""Terminal tables of evaluation results (rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from lorashelf.evaluate.runner import EvalResult


def results_table(results: Sequence[EvalResult], title: str = "evaluation") -> Table:
    """One row per (task, method); best accuracy and lowest NLL per task in bold."""
    table = Table(title=title)
    for col, just in (
        ("task", "left"),
        ("method", "left"),
        ("n", "right"),
        ("accuracy", "right"),
        ("gold NLL", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    tasks = list(dict.fromkeys(t for r in results for t in r.tasks))
    for task in tasks:
        rows = [(r.method, r.tasks[task]) for r in results if task in r.tasks]
        best_acc = max(tr.accuracy for _, tr in rows)
        best_nll = min(tr.nll for _, tr in rows)
        for i, (method, tr) in enumerate(rows):
            acc = f"{tr.accuracy:.3f}"
            nll = f"{tr.nll:.3f}"
            if len(rows) > 1 and tr.accuracy == best_acc:
                acc = f"[bold]{acc}[/bold]"
            if len(rows) > 1 and tr.nll == best_nll:
                nll = f"[bold]{nll}[/bold]"
            table.add_row(task if i == 0 else "", method, str(tr.n), acc, nll)
        table.add_section()
    for r in results:
        table.add_row(
            "[italic]mean[/italic]", r.method, "", f"{r.mean_accuracy:.3f}", f"{r.mean_nll:.3f}"
        )
    return table


def print_results(
    results: Sequence[EvalResult], title: str = "evaluation", console: Console | None = None
) -> None:
    (console or Console()).print(results_table(results, title))
