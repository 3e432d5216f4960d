"""The study's statistics, claim verdicts and report (``lorashelf demo --suite study``).

Everything is read from the run's files: each (method, task) results file, the
per-task few-shot files, the clusterings' agreement with the task families, the mean
parameter cosines and ``stages.json``. For every method and for the seen-family,
unseen-family and all held-out tasks separately: the mean gold NLL and accuracy with
95% two-level bootstrap intervals (tasks, then examples; lorashelf.evaluate.stats),
each task's interval over its examples, and paired sign-flip tests of the per-example
NLL against the base model and against private + Arrow. :func:`claim_verdicts` turns
the README's four claims into "holds" / "does not hold" / "not distinguishable" from
the paired test on the results JSON alone, so anyone can recompute them.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.evaluate.stats import bootstrap_ci, mean_over_tasks_ci, paired_test

BASE, ARROW = "base", "private + arrow"
ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    """``a`` has a lower gold NLL than ``b`` on the held-out tasks of ``group``."""

    id: str
    text: str
    a: str
    b: str


# The issue's claims (a)-(d) of the papers, each as paired comparisons of gold NLL
# (a claim with two comparisons holds only where both do).
CLAIMS = (
    Claim("a", "Arrow beats uniform merging: private + Arrow against private + uniform",
          ARROW, "private + uniform"),
    Claim("b", "MBC libraries beat private libraries under Arrow: MBC + Arrow against "
          "private + Arrow", "mbc + arrow", ARROW),
    Claim("b", "MBC libraries beat private libraries under uniform merging: MBC + uniform "
          "against private + uniform", "mbc + uniform", "private + uniform"),
    Claim("c", "routing beats the shared expert: private + Arrow against the shared expert "
          "(one LoRA on the union of the training tasks)", ARROW, "shared"),
    Claim("d", "LoraHub (5 shots) beats zero-shot: against the base model", "few-shot lorahub",
          BASE),
    Claim("d", "LoraHub (5 shots) beats zero-shot: against the best zero-shot router, "
          "private + Arrow", "few-shot lorahub", ARROW),
)  # fmt: skip


# ---------------------------------------------------------------------- collecting
def collect(study: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """label -> task -> {"nlls", "correct", "seconds"} from every finished results file."""
    from lorashelf.demo.study import zero_shot_evals

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in zero_shot_evals(study.plan):
        for task in study.suite.evaluated:
            path = study.result_path(e, task)
            if path.exists():
                r = json.loads(path.read_text())["tasks"][task]
                out.setdefault(e.label, {})[task] = _row(r)
    for task in study.suite.evaluated:
        path = study.fewshot_path(task)
        if not path.exists():
            continue
        for entry in json.loads(path.read_text()).get("methods", []):
            r = entry["tasks"][task]
            if r.get("nlls"):
                out.setdefault(f"few-shot {entry['method']}", {})[task] = _row(r)
    return out


def _row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"nlls": list(r["nlls"]), "correct": [float(c) for c in r["correct"]],
            "seconds": float(r.get("seconds", 0.0))}  # fmt: skip


# ---------------------------------------------------------------------- statistics
def paired(
    per_example: Mapping[str, Mapping[str, Any]], a: str, b: str, tasks: Sequence[str]
) -> dict[str, Any] | None:
    """Paired test of ``a - b`` per-example NLL pooled over the ``tasks`` both have."""
    if a not in per_example or b not in per_example:
        return None
    common = [t for t in tasks if t in per_example[a] and t in per_example[b]]
    xs = [x for t in common for x in per_example[a][t]["nlls"]]
    ys = [y for t in common for y in per_example[b][t]["nlls"]]
    if not common or len(xs) != len(ys):
        return None
    p = paired_test(xs, ys)
    wins = sum(_mean(per_example[a][t]["nlls"]) < _mean(per_example[b][t]["nlls"]) for t in common)
    return {"diff": p.diff.mean, "lo": p.diff.lo, "hi": p.diff.hi, "p": p.p_value,
            "n": p.n, "tasks": len(common), "task_wins": wins}  # fmt: skip


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def verdict(test: Mapping[str, Any] | None) -> str:
    """``a`` beats ``b`` (lower NLL) when the paired test rejects at 5% and the whole
    interval of the difference is below 0; the opposite when it is above 0."""
    if test is None:
        return "not measured"
    if test["p"] < ALPHA and test["hi"] < 0:
        return "holds"
    if test["p"] < ALPHA and test["lo"] > 0:
        return "does not hold"
    return "not distinguishable"


def summarise(
    per_example: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Per group and method: intervals over tasks, per-task intervals, paired tests."""
    out: dict[str, Any] = {}
    for group, tasks in groups.items():
        rows = []
        for label, per_task in per_example.items():
            have = [t for t in tasks if t in per_task]
            if not have:
                continue
            nll = mean_over_tasks_ci({t: per_task[t]["nlls"] for t in have})
            acc = mean_over_tasks_ci({t: per_task[t]["correct"] for t in have})
            rows.append({
                "method": label, "tasks": len(have),
                "nll": [nll.mean, nll.lo, nll.hi], "accuracy": [acc.mean, acc.lo, acc.hi],
                "per_task": {t: {"nll": _ci(per_task[t]["nlls"]), "accuracy": _ci(per_task[t]["correct"]),
                                 "n": len(per_task[t]["nlls"])} for t in have},
                "vs_base": paired(per_example, label, BASE, have) if label != BASE else None,
                "vs_arrow": paired(per_example, label, ARROW, have) if label != ARROW else None,
            })  # fmt: skip
        out[group] = sorted(rows, key=lambda r: r["nll"][0])
    return out


def _ci(values: Sequence[float]) -> list[float]:
    i = bootstrap_ci(values)
    return [i.mean, i.lo, i.hi]


def claim_verdicts(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each claim's verdict per group, from a results JSON (its ``per_example`` and
    ``groups``) alone."""
    per_example, groups = results["per_example"], results["groups"]
    ks = results.get("suite", {}).get("study", {}).get("retrain_ks") or [8]
    k = max(ks)  # the cluster library the study trained
    label = {"mbc + arrow": f"mbc-k{k} + arrow", "mbc + uniform": f"mbc-k{k} + uniform"}
    out = []
    for c in CLAIMS:
        a, b = label.get(c.a, c.a), label.get(c.b, c.b)
        by_group = {}
        for group, tasks in groups.items():
            test = paired(per_example, a, b, tasks)
            by_group[group] = {"verdict": verdict(test), "test": test}
        out.append({"id": c.id, "text": c.text, "a": a, "b": b, "groups": by_group})
    return out


# ---------------------------------------------------------------------- report
def study_results(study: Any) -> dict[str, Any]:
    """The results JSON: per-example values, summaries, claims, clustering, timings."""
    per_example = collect(study)
    s = study.suite
    groups = {"seen": list(s.heldout), "unseen": list(s.unseen), "all": s.evaluated}
    groups = {g: t for g, t in groups.items() if t}
    d = study.out / "clusters"
    agreement = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("agreement*.json"))}
    cosines = json.loads((d / "cosines.json").read_text()) if (d / "cosines.json").exists() else {}
    stages = study.out / "stages.json"
    results: dict[str, Any] = {
        "canary": s.canary,
        "suite": {"name": s.name, "train": list(s.train), "heldout": dict(s.heldout),
                  "unseen": list(s.unseen), "eval_limit": s.eval_limit, "study": dict(s.study),
                  "budget": (f"{s.train_steps} steps per expert, batch {s.train_batch}, "
                             f"{s.train_examples} examples read per task, {s.max_length} tokens; "
                             f"gates {s.gate_steps} steps; few-shot {s.shots} shots x {s.seeds} "
                             f"seed(s), LoraHub {s.lorahub_budget} evaluations")},
        "groups": groups,
        "per_example": per_example,
        "summary": summarise(per_example, groups),
        "agreement": {k: _agreement_summary(v) for k, v in agreement.items()},
        "cosines": cosines,
        "stages": json.loads(stages.read_text()) if stages.exists() else {},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }  # fmt: skip
    results["claims"] = claim_verdicts(results)
    return results


def _agreement_summary(doc: Any) -> list[dict[str, Any]]:
    from lorashelf.cluster.agreement import summarise as ari_summary

    rows = doc.get("runs", doc) if isinstance(doc, dict) else doc
    return ari_summary(rows) if isinstance(rows, list) else []


def _fmt(ci: Sequence[float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _test(t: Mapping[str, Any] | None, wins: bool = False) -> str:
    if t is None:
        return "-"
    count = f"; lower on {t['task_wins']}/{t['tasks']} tasks" if wins and "task_wins" in t else ""
    return f"{t['diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}] (p={t['p']:.3g}{count})"


def markdown(results: Mapping[str, Any], command: str, figures: Sequence[str]) -> str:
    s = results["suite"]
    lines = [
        "# lorashelf study report", "",
        f"Suite {s['name']!r}: {len(s['train'])} training tasks, {len(s['heldout'])} held-out "
        f"tasks of seen families and {len(s['unseen'])} of unseen families, up to "
        f"{s['eval_limit']} test examples each. Machine: {results['machine']}. Every number "
        "is read from this run's files (`results.json` beside this report).", "",
        f"Budget: {s['budget']}.", "",
        f"BIG-bench canary: {results['canary']}", "",
        "## Claims", "",
        "| claim | " + " | ".join(results["groups"]) + " |",
        "|---|" + "---|" * len(results["groups"]),
    ]  # fmt: skip
    for c in results["claims"]:
        cells = []
        for g in results["groups"]:
            v = c["groups"][g]
            cells.append(
                f"{v['verdict']}: {_test(v['test'], wins=True)}" if v["test"] else v["verdict"]
            )
        lines.append(f"| ({c['id']}) {c['text']} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: the mean per-example gold NLL difference (first method minus "
              "second; negative favours the first) with its 95% interval, the paired sign-flip "
              f"p-value, and on how many tasks the first method's mean NLL is lower. A claim holds when "
              f"the test rejects at {ALPHA} and the interval lies below 0. The test is over the "
              "examples of these tasks; the task count shows whether the effect is broad or "
              "carried by a few tasks.", ""]  # fmt: skip
    for group, rows in results["summary"].items():
        if not rows:
            continue
        lines += [f"## Methods on {group} held-out tasks (sorted by mean gold NLL)", "",
                  "| method | tasks | gold NLL [95% CI] | accuracy [95% CI] | NLL vs base (paired) | NLL vs private + arrow (paired) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['method']} | {r['tasks']} | {_fmt(r['nll'])} | {_fmt(r['accuracy'])} | "
                         f"{_test(r['vs_base'])} | {_test(r['vs_arrow'])} |")  # fmt: skip
        lines.append("")
    lines += per_task_table(results)
    if results["cosines"]:
        c = results["cosines"]
        lines += ["## Parameter similarity", "", f"Mean cosine between the {int(c['n_experts'])} "
                  f"private experts: {c['raw']:.3f} raw, {c['centered']:.3f} after `--center`.", ""]  # fmt: skip
    if results["agreement"]:
        lines += ["## Do the clusterings recover the task families? (ARI)", "",
                  "| clustering | method | seeds | ARI mean | std |", "|---|---|---|---|---|"]  # fmt: skip
        for name, rows in results["agreement"].items():
            for r in rows:
                lines.append(
                    f"| {name} | {r['method']} | {r['seeds']} | {r['ari_mean']:.3f} | {r['ari_std']:.3f} |"
                )
        lines.append("")
    cut = results["suite"]["study"].get("cut")
    if cut:
        lines += ["## What the budget cut", "", cut, ""]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    lines += [
        "## Wall time per stage",
        "",
        "| stage | seconds (all runs) | runs |",
        "|---|---|---|",
    ]
    for name, st in results["stages"].items():
        lines.append(f"| {name} | {st['seconds']:.0f} | {len(st['runs'])} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def per_task_table(results: Mapping[str, Any]) -> list[str]:
    """Each method's gold NLL on each held-out task with its interval over examples."""
    rows = results["summary"].get("all", [])
    tasks = results["groups"].get("all", [])
    if not rows:
        return []
    short = [t.split(":", 1)[-1] for t in tasks]
    lines = ["## Gold NLL per held-out task [95% CI over its examples]", "",
             "| method | " + " | ".join(short) + " |", "|---|" + "---|" * len(tasks)]  # fmt: skip
    for r in rows:
        cells = [_fmt(r["per_task"][t]["nll"]) if t in r["per_task"] else "-" for t in tasks]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def ari_plot(results: Mapping[str, Any], out: Path) -> Path | None:
    """Mean ARI against the task families per k, for MBC, centred MBC and random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for name, rows in results["agreement"].items():
        k = int(name.rsplit("-k", 1)[1])
        center = "-center" in name
        for r in rows:
            if r["method"] == "random" and center:
                continue  # the same random partitions as without --center
            label = f"{r['method']}{' --center' if center else ''}"
            series.setdefault(label, []).append((k, r["ari_mean"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([k for k, _ in pts], [a for _, a in pts], marker="o", label=label)
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("ARI against the task families")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def interval_plot(results: Mapping[str, Any], out: Path) -> Path:
    """Mean gold NLL with its 95% interval per method, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(results["summary"])
    n = max(len(results["summary"][g]) for g in groups)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.5 * len(groups), 0.32 * n + 1.6), squeeze=False
    )
    for ax, g in zip(axes[0], groups, strict=True):
        rows = results["summary"][g]
        y = range(len(rows))
        mean = [r["nll"][0] for r in rows]
        err = [[r["nll"][0] - r["nll"][1] for r in rows], [r["nll"][2] - r["nll"][0] for r in rows]]
        ax.errorbar(mean, list(y), xerr=err, fmt="o", color="#2b8cbe", ecolor="#a6bddb", capsize=2)
        ax.set_yticks(list(y), [r["method"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mean gold NLL per token, 95% CI (lower is better)")
        ax.set_title(f"{g} held-out tasks")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_study_report(study: Any, report_dir: Path, command: str) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results = study_results(study)
    write_json_atomic(report_dir / "results.json", results)
    figures = []
    if results["summary"]:
        figures.append(interval_plot(results, report_dir / "methods.png").name)
    ari = ari_plot(results, report_dir / "ari.png")
    if ari is not None:
        figures.append(ari.name)
    for png in sorted((study.out / "clusters").glob("*.png")):
        (report_dir / png.name).write_bytes(png.read_bytes())
        figures.append(png.name)
    md = report_dir / "report.md"
    md.write_text(markdown(results, command, figures))
    return md
