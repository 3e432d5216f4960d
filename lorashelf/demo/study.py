"""The library at scale (``lorashelf demo --suite study``): many experts, every method.

A study suite (``lorashelf/suites/study.json``, chosen by
lorashelf.demo.make_study_suite) trains one expert per training task plus the shared
expert, clusters the library with MBC at several k with and without ``--center`` and a
random baseline of the same sizes, trains the cluster libraries its budget allows
(``study.retrain_ks`` x ``study.retrain_kinds``; the rest get clustering-only agreement with the task
families), and evaluates every registered zero-shot method and the few-shot ones on
held-out tasks of seen and unseen families. Like the demo, every step is one
``lorashelf`` command, and everything resumes: training skips experts already in a
library, each (method, held-out task) and each few-shot task has its own results file,
and one ``eval`` per method runs the tasks it still lacks (a merge of 64 experts is
built once per method, not once per task). ``--stage NAME`` reruns one stage from scratch
(its outputs are removed first). ``stages.json`` keeps the wall time of every stage
over all runs; the report (lorashelf.demo.study_report) copies it into its results JSON.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.demo.pipeline import Demo
from lorashelf.errors import LorashelfError, did_you_mean

ORACLE_FREE = ("base", "expert", "best-expert")  # methods that run on unseen tasks too


@dataclass(frozen=True)
class StudyPlan:
    """The ``study`` block of a suite: what the budget allows (docs/study/SUITE.md)."""

    cluster_ks: tuple[int, ...] = (4, 8, 16)
    retrain_ks: tuple[int, ...] = (8,)  # cluster libraries trained; the others: agreement only
    retrain_kinds: tuple[str, ...] = ("mbc", "mbc-center", "random")  # which, at retrain_ks
    agreement_seeds: int = 3
    fewshot_methods: tuple[str, ...] = ("lorahub", "gradient", "cat")
    skip_methods: tuple[str, ...] = ()  # registered zero-shot methods left out, said in the report
    # a method's options where its defaults do not fit the budget ({"wudi": {"steps": 30}}),
    # passed as ``eval --set`` and written into its label
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cut: str = ""  # what the budget cut and why, printed in the report

    @classmethod
    def from_suite(cls, block: dict[str, Any]) -> StudyPlan:
        known = set(cls.__dataclass_fields__)
        for key in block:
            if key not in known:
                raise LorashelfError(
                    f"unknown study key {key!r}{did_you_mean(key, known)}; known: {', '.join(sorted(known))}"
                )
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items()}
        plan = cls(**data)
        bad = [k for k in plan.retrain_ks if k not in plan.cluster_ks]
        if bad:
            raise LorashelfError(f"study.retrain_ks {bad} must be among study.cluster_ks")
        kinds = ("mbc", "mbc-center", "random")
        wrong = [k for k in plan.retrain_kinds if k not in kinds]
        if wrong:
            raise LorashelfError(f"study.retrain_kinds {wrong}: choose from {', '.join(kinds)}")
        return plan

    def retrained(self, name: str, k: int) -> bool:
        """Is clustering ``name`` (``mbc-center-k8``) trained into a cluster library?"""
        return k in self.retrain_ks and name.rsplit("-k", 1)[0] in self.retrain_kinds


@dataclass(frozen=True)
class Eval:
    """One evaluated method: its label in the report, library subdir, ``--method``."""

    label: str
    lib: str | None
    method: str
    settings: tuple[tuple[str, Any], ...] = ()  # eval --set KEY=VALUE

    @property
    def slug(self) -> str:
        slug = self.label.lower().replace(" + ", "-").replace(" ", "-").replace(":", "-")
        return slug.replace("(", "").replace(")", "").replace(",", "")


def clusterings(plan: StudyPlan) -> Iterator[tuple[str, int, list[str]]]:
    """(name, k, extra ``cluster`` args) of every clustering the study makes."""
    for k in plan.cluster_ks:
        yield f"mbc-k{k}", k, ["--method", "mbc"]
        yield f"mbc-center-k{k}", k, ["--method", "mbc", "--center"]
        yield f"random-k{k}", k, ["--method", "random", "--sizes-from", f"mbc-k{k}.json"]


def zero_shot_evals(plan: StudyPlan) -> list[Eval]:
    """Every registered zero-shot method on the private library, the bounds, the shared
    expert, and uniform + Arrow on each retrained cluster library."""
    from lorashelf.methods import OWN, method_names

    evals = [
        Eval("base", None, "base"),
        Eval("shared", "shared", "expert:shared"),
        Eval("oracle", "private", "oracle"),
        Eval("best-expert:test", "private", "best-expert:test"),
        Eval("best-expert:shots", "private", "best-expert:shots"),
    ]
    for m in method_names():
        if m not in OWN:
            sets = tuple(plan.method_settings.get(m, {}).items())
            note = f" ({', '.join(f'{k} {v}' for k, v in sets)})" if sets else ""
            evals.append(Eval(f"private + {m}{note}", "private", m, sets))
    for name, k, _ in clusterings(plan):
        if plan.retrained(name, k):
            evals += [Eval(f"{name} + {m}", f"libs/{name}", m) for m in ("uniform", "arrow")]
    return [e for e in evals if e.method not in plan.skip_methods]


def task_slug(task_id: str) -> str:
    return task_id.replace(":", "__").replace("/", "__")


class Study(Demo):
    """The study's stages on top of the demo's commands (pull, train, gates)."""

    @property
    def plan(self) -> StudyPlan:
        return StudyPlan.from_suite(self.suite.study)

    def stages(self) -> dict[str, tuple[Callable[[], None], list[Path]]]:
        """Stage name -> (what it runs, what ``--stage NAME`` removes before rerunning)."""
        o = self.out
        return {
            "pull": (self.pull, []),
            "train": (self.train, [o / "private", o / "shared"]),
            "cluster": (self.cluster, [o / "clusters"]),
            "build": (self.build, [o / "libs"]),
            "gates": (self.gates, [o / "private" / "derived" / "phatgoose"]),
            "evaluate": (self.evaluate, [o / "results"]),
            "fewshot": (self.fewshot, [o / "fewshot"]),
        }

    # ------------------------------------------------------------------ stages
    def model_opts(self) -> list[str]:
        return ["--model", self.suite.model] if self.suite.model else []

    def train_opts(self) -> list[str]:
        return [*super().train_opts(), *self.model_opts()]

    def cluster(self) -> None:
        """Every clustering, its agreement with the families, and the mean cosines."""
        d = self.out / "clusters"
        d.mkdir(parents=True, exist_ok=True)
        private = self.out / "private"
        for name, k, extra in clusterings(self.plan):
            out = d / f"{name}.json"
            if out.exists():
                continue
            extra = [str(d / a) if a.endswith(".json") else a for a in extra]
            # heatmaps of the MBC clusterings at the retrained k (a random one orders nothing)
            mbc_k = k == max(self.plan.retrain_ks) and not name.startswith("random")
            plot = ["--plot", d / f"{name}.png"] if mbc_k else []
            self.lorashelf("cluster", private, "--k", k, *extra, "--out", out, *plot)
        suite_file = self.out / "suite.json"
        write_json_atomic(
            suite_file, {"families": self.suite.families, "canary": self.suite.canary}
        )
        for k in self.plan.cluster_ks:
            for center in (False, True):
                out = d / f"agreement{'-center' if center else ''}-k{k}.json"
                if not out.exists():
                    self.lorashelf("cluster-check", private, "--families", suite_file, "--k", k,
                                   "--methods", "mbc,random", "--seeds", self.plan.agreement_seeds,
                                   *(["--center"] if center else []), "--json", out)  # fmt: skip
        cosines = d / "cosines.json"
        if not cosines.exists():
            write_json_atomic(cosines, mean_cosines(private))

    def build(self) -> None:
        for name, k, _ in clusterings(self.plan):
            if self.plan.retrained(name, k):
                self.lorashelf("build", self.out / "private", "--clusters",
                               self.out / "clusters" / f"{name}.json", "--out", self.out / "libs" / name)  # fmt: skip

    def result_path(self, e: Eval, task: str) -> Path:
        return self.out / "results" / e.slug / f"{task_slug(task)}.json"

    def evaluate(self) -> None:
        """One ``eval`` per method over every held-out task it still lacks (so a merge of
        64 experts is built once, not once per task), split into one results file per
        (method, task): an interrupted run redoes at most one method's tasks."""
        unseen = set(self.suite.unseen)
        for e in zero_shot_evals(self.plan):
            tasks = [t for t in self.suite.evaluated if not (e.method == "oracle" and t in unseen)]
            todo = [t for t in tasks if not self.result_path(e, t).exists()]
            if not todo:
                continue
            both = self.out / "results" / e.slug / "all-tasks.json"
            argv = ["eval", "--tasks", ",".join(todo), "--limit", str(self.suite.eval_limit),
                    "--method", e.method, "--json", both]  # fmt: skip
            if e.lib is not None:
                argv.insert(1, self.out / e.lib)
            else:
                argv += self.model_opts()
            for k, v in e.settings:
                argv += ["--set", f"{k}={v}"]
            if e.method == "oracle":  # seen families only: the sibling is the oracle's expert
                argv += ["--oracle-map", ",".join(f"{t}={self.suite.heldout[t]}" for t in todo)]
            self.lorashelf(*argv)
            split_by_task(both, {t: self.result_path(e, t) for t in todo})

    def fewshot_path(self, task: str) -> Path:
        return self.out / "fewshot" / f"{task_slug(task)}.json"

    def fewshot(self) -> None:
        if not self.plan.fewshot_methods:
            return
        for task in self.suite.evaluated:
            out = self.fewshot_path(task)
            if out.exists():
                continue
            self.lorashelf("fewshot", self.out / "private", "--tasks", task,
                           "--shots", self.suite.shots, "--seeds", self.suite.seeds,
                           "--limit", self.suite.eval_limit,
                           "--methods", ",".join(self.plan.fewshot_methods),
                           "--budget", self.suite.lorahub_budget, "--json", out)  # fmt: skip

    # ------------------------------------------------------------------ running
    def run_stage(self, name: str, fn: Callable[[], None]) -> None:
        """Run one stage and add its wall time to ``stages.json`` (also when it fails)."""
        t0, done = time.perf_counter(), False
        try:
            self.stage(name, fn)
            done = True
        finally:
            record_stage(self.out / "stages.json", name, time.perf_counter() - t0, done)

    def run(self, only: str | None = None) -> None:  # type: ignore[override]
        self.out.mkdir(parents=True, exist_ok=True)
        stages = self.stages()
        if only is not None:
            if only not in stages:
                raise LorashelfError(
                    f"unknown stage {only!r}{did_you_mean(only, stages)}; stages: {', '.join(stages)}, report"
                )
            fn, outputs = stages[only]
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
            self.run_stage(only, fn)
            return
        for name, (fn, _) in stages.items():
            self.run_stage(name, fn)


def split_by_task(path: Path, outputs: Mapping[str, Path]) -> None:
    """Write each task of the eval JSON at ``path`` as its own results file (the format
    a one-task ``eval --json`` writes), then remove ``path``."""
    from lorashelf.evaluate.runner import EvalResult, result_from_json

    result = result_from_json(json.loads(path.read_text()))
    for task, out in outputs.items():
        one = EvalResult(result.method, {task: result.tasks[task]}, result.config, result.meta)
        write_json_atomic(out, one.to_json())
    path.unlink()


def record_stage(path: Path, name: str, seconds: float, done: bool) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = data.setdefault(name, {"seconds": 0.0, "runs": []})
    entry["seconds"] += seconds
    entry["runs"].append({"seconds": round(seconds, 3), "finished": done, "at": time.time()})
    write_json_atomic(path, data)


def mean_cosines(library: Path) -> dict[str, float]:
    """The mean parameter cosine over all pairs of experts, raw and after ``--center``
    (MBC's similarity: sparsified flattened LoRA parameters, no SVD reduction)."""
    import torch

    from lorashelf.cluster.similarity import SimilarityConfig, parameter_similarity
    from lorashelf.library import Library

    lib = Library.open(library)
    names = lib.names()
    out = {}
    for center in (False, True):
        cfg = SimilarityConfig(svd_dim=None, center=center)
        sim = parameter_similarity(names, lambda n: lib.get(n).lora_factors(), cfg).matrix
        off = ~torch.eye(len(names), dtype=torch.bool)
        out["centered" if center else "raw"] = float(sim[off].mean())
    out["n_experts"] = float(len(names))
    return out
