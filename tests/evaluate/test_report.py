"""Reports: metric tables bold the best per row; HTML embeds its images."""

from __future__ import annotations

from lorashelf.evaluate.plots import loss_curves, method_bars, weight_heatmap
from lorashelf.evaluate.report import Report, Section, metric_table, write_report
from lorashelf.evaluate.runner import EvalConfig, EvalResult, TaskResult


def result(method: str, accs: dict[str, float], nlls: dict[str, float]) -> EvalResult:
    tasks = {
        t: TaskResult(n=10, accuracy=a, nll=nlls[t], kind="mc", seconds=1.0)
        for t, a in accs.items()
    }
    return EvalResult(method=method, tasks=tasks, config=EvalConfig())


RESULTS = [
    result("base", {"t1": 0.2, "t2": 0.5}, {"t1": 2.0, "t2": 1.0}),
    result("arrow", {"t1": 0.4, "t2": 0.3}, {"t1": 1.5, "t2": 1.2}),
]


def test_metric_table_marks_best_per_row():
    acc = metric_table(RESULTS, "accuracy")
    assert acc[0] == ["task", "base", "arrow"]
    assert acc[1] == ["t1", "0.200", "**0.400**"]
    assert acc[2] == ["t2", "**0.500**", "0.300"]
    assert acc[3] == ["mean", "**0.350**", "**0.350**"]  # a tie: both are the best
    nll = metric_table(RESULTS, "nll")
    assert nll[1] == ["t1", "2.000", "**1.500**"]
    assert nll[2] == ["t2", "**1.000**", "1.200"]
    assert nll[3] == ["mean", "1.500", "**1.350**"]
    by_method = metric_table(RESULTS, "nll", methods_in_rows=True)
    assert by_method[0] == ["method", "t1", "t2", "mean"]
    assert by_method[1] == ["base", "2.000", "**1.000**", "1.500"]
    assert by_method[2] == ["arrow", "**1.500**", "1.200", "**1.350**"]


def test_write_report_md_and_self_contained_html(tmp_path):
    bars = method_bars(RESULTS, tmp_path / "bars.png")
    curves = loss_curves({"e1": [2.0, 1.5, 1.0]}, tmp_path / "loss.png")
    heat = weight_heatmap(["t1"], ["e1", "e2"], [[0.5, -0.2]], tmp_path / "w.png")
    rep = Report(
        title="demo", intro="What this is.", results=RESULTS,
        sections=[Section("Averages", image=bars), Section("Loss", image=curves),
                  Section("Weights", text="LoraHub weights.", image=heat)],
        command="lorashelf demo", versions={"torch": "x"}, timings={"train": 1.0, "eval": 2.0},
    )  # fmt: skip
    md, page = write_report(rep, tmp_path)
    text = md.read_text()
    assert "| t1 | 0.200 | **0.400** |" in text
    assert "![Averages](bars.png)" in text and "| total | 3.0 |" in text
    doc = page.read_text()
    assert doc.count("data:image/png;base64,") == 3
    assert "<b>0.400</b>" in doc and "bars.png" not in doc
