"""The main job end to end on the quick suite (real SmolLM2, real BIG-bench): it writes
the report with numbers, and re-running resumes without retraining and reproduces
the evaluation exactly."""

from __future__ import annotations

import json
import re

import pytest

from lorashelf.cli import main

pytestmark = pytest.mark.slow


def test_quick_demo_report_resume_and_reproducibility(real_home, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--home", str(real_home), "demo", "--quick", "--out", str(out)]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "## Accuracy (held-out tasks)" in report
    assert "| method | bigbench:arithmetic/3_digit_addition |" in report  # methods in rows
    labels = ("| base |", "| private + Arrow |", "| PHATGOOSE |", "| LoraHub 5-shot",
              "| CAT 5-shot", "| best expert (chosen on test: upper bound) |")  # fmt: skip
    tables = report.split("## Accuracy (held-out tasks)")[1].split("## Mean over")[0]
    rows = [line for line in tables.splitlines() if line.startswith(labels)]
    assert len(rows) == 2 * len(labels), rows  # in the accuracy and the NLL table
    assert all(len(re.findall(r"\d\.\d{3}", r)) == 3 for r in rows), rows  # 2 tasks + mean
    assert "## Methods" in report and "best expert (chosen on test: upper bound): " in report
    assert page.count("data:image/png;base64,") >= 4
    for name in ("base", "private-arrow", "mbc-uniform", "oracle", "phatgoose", "fewshot-lorahub",
                 "fewshot-cat", "best-expert-chosen-on-test-upper-bound"):  # fmt: skip
        assert (out / "results" / f"{name}.json").exists(), name

    from lorashelf.library import Library

    created = {
        n: Library.open(out / "private").get(n).created
        for n in Library.open(out / "private").names()
    }
    arrow = json.loads((out / "results" / "private-arrow.json").read_text())
    (out / "results" / "private-arrow.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "skipped" in log  # experts already in the library were not retrained
    again = {n: Library.open(out / "private").get(n).created for n in created}
    assert again == created
    rerun = json.loads((out / "results" / "private-arrow.json").read_text())
    for task, res in arrow["tasks"].items():
        assert rerun["tasks"][task]["accuracy"] == res["accuracy"]
        assert rerun["tasks"][task]["nll"] == pytest.approx(res["nll"], abs=1e-6)
