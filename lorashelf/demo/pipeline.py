"""The main job: build a library, reuse it every way, and report (``lorashelf demo``).

Every stage is one ``lorashelf`` command, run in this process exactly as a user would
type it (the report lists them), and every stage resumes: training skips experts
already in a library, gate training skips experts with gates, and an evaluation
whose results file exists is not run again. Stages:

1. pull the embedded SmolLM2 and the suite's BIG-bench tasks;
2. train the private library (one expert per training task) and the shared expert;
3. cluster the private library with MBC and train the cluster library;
4. train PHATGOOSE gates for the private experts;
5. evaluate the methods of Ostapenko et al. on the held-out tasks;
6. evaluate the suite's other merges and routers on the private library (every
   registered one without a ``more_methods`` list), with the best-single-expert
   baselines, in one ``eval`` (one model load);
7. GenKnowSub (suites with ``general`` tasks): a general-knowledge expert trained on
   plain text (``data text``) into a copy of the private library, then Arrow with its
   mean subtracted, in PEFT's variant and the exact one;
8. few-shot: the suite's few-shot methods (LoraHub, CAT, ...), over seeds;
9. write ``report.md`` and ``report.html``.

The ``demo`` suite is the core story (about a quarter hour here); ``demo-all`` has the
same tasks and budget and every method, so running it into the same directory after
``demo`` adds only the methods ``demo`` left out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from lorashelf.demo.suite import Suite
from lorashelf.errors import LorashelfError

# (label in the report, library subdir or None for the bare base model, --method)
EVALS = (
    ("base", None, "base"),
    ("shared", "shared", "expert:shared"),
    ("private + uniform", "private", "uniform"),
    ("private + Arrow", "private", "arrow"),
    ("MBC + uniform", "mbc", "uniform"),
    ("MBC + Arrow", "mbc", "arrow"),
    ("oracle", "private", "oracle"),
    ("PHATGOOSE", "private", "phatgoose"),
)
# the best single expert: chosen on the test examples (an upper bound), or on 5 shots
BASELINES = (
    ("best expert (chosen on test: upper bound)", "best-expert:test"),
    ("best expert (chosen on 5 shots)", "best-expert:shots"),
)
# WUDI's authors take 300 Adam steps at lr 1e-5 per module: about 2 minutes for 8
# SmolLM2 experts on this CPU, longer than every other merge together. The demo takes
# 30 steps at lr 1e-4 (the same largest move per entry, 3e-3) and says so in the label.
CHEAP = {"wudi": {"steps": 30, "lr": 1e-4}}
# GenKnowSub (Arrow over the experts minus a general-knowledge expert's update) in both
# variants, on a copy of the private library plus that expert (so every other method
# keeps the private library as it is)
GENERAL_LIBRARY = "private+general"
GKS_VARIANTS = ("delta", "peft")
FEWSHOT_NAMES = {"lorahub": "LoraHub", "gradient": "gradient", "cat": "CAT", "icl": "ICL",
                 "lora": "LoRA on the shots"}  # fmt: skip


def more_methods(suite: Suite) -> list[tuple[str, str]]:
    """(label, method) of every registered merge and router that :data:`EVALS` leaves
    out on the private library, then :data:`BASELINES`: a new method joins the demo the
    day its registry line is added. A suite may keep only some (``more_methods``)."""
    from lorashelf.merge.registry import MERGES
    from lorashelf.route.registry import ROUTERS

    done = {m for _, lib, m in EVALS if lib == "private"}
    out = []
    for name in [*MERGES.names(), *ROUTERS.names()]:
        if name not in done:
            opts = ", ".join(f"{k} {v}" for k, v in CHEAP.get(name, {}).items())
            out.append((f"private + {name}" + (f" ({opts})" if opts else ""), name))
    out += BASELINES
    keep = suite.more_methods
    return out if keep is None else [(label, m) for label, m in out if m in keep]


def gks_rows(suite: Suite) -> list[tuple[str, str]]:
    """(label, variant) of the GenKnowSub rows a suite with ``general`` tasks runs."""
    if not suite.general:
        return []
    return [(f"private + Arrow + GenKnowSub ({v})", v) for v in GKS_VARIANTS]


def fewshot_methods(suite: Suite) -> list[str]:
    """Every few-shot method of ``fewshot`` that uses the shots (zero-shot is ``base``),
    or the suite's ``fewshot_methods``."""
    from lorashelf.compose.registry import FEWSHOT_METHODS

    names = [n for n in FEWSHOT_METHODS.names() if n != "zero-shot"]
    keep = suite.fewshot_methods
    return names if keep is None else [n for n in names if n in keep]


@dataclass
class Demo:
    """One demo run in ``out`` with ``suite``; ``run(argv)`` runs one CLI command."""

    out: Path
    suite: Suite
    home: Path
    run_cli: Callable[[list[str]], int]
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)
    all_runs: dict[str, float] = field(default_factory=dict)  # summed over resumed runs
    runs: int = 0  # runs into this directory (timings.json)
    commands: list[str] = field(default_factory=list)

    def lorashelf(self, *argv: str) -> None:
        args = [str(a) for a in argv]
        self.commands.append("lorashelf " + shlex.join(args))
        self.console.print(f"[dim]$ lorashelf {shlex.join(args)}[/dim]")
        rc = self.run_cli(["--home", str(self.home), *args])
        if rc != 0:
            raise LorashelfError(f"demo stage failed: lorashelf {shlex.join(args)} (exit {rc})")

    def stage(self, title: str, fn: Callable[[], None]) -> None:
        self.console.print(Rule(f"[bold]{title}"))
        t0 = time.perf_counter()
        fn()
        self.timings[title] = self.timings.get(title, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ stages
    def pull(self) -> None:
        if not self.suite.model:  # a suite on another base model pulls nothing here
            self.lorashelf("model", "pull")
        root = self.home / "data" / "bigbench" / "benchmark_tasks"
        missing = [n for n in self.suite.bigbench_names if not (root / n / "task.json").exists()]
        if missing:
            self.lorashelf("data", "pull", "bigbench", "--only", *missing)

    def train_opts(self) -> list[str]:
        s = self.suite
        return ["--steps", str(s.train_steps), "--max-examples", str(s.train_examples),
                "--batch-size", str(s.train_batch), "--max-length", str(s.max_length)]  # fmt: skip

    def train(self) -> None:
        tasks = ",".join(self.suite.train)
        self.lorashelf("train", self.out / "private", "--tasks", tasks, *self.train_opts())
        self.lorashelf("train", self.out / "shared", "--tasks", tasks,
                       "--joint", "shared", *self.train_opts())  # fmt: skip

    def cluster(self) -> None:
        clusters = self.out / "clusters.json"
        if not clusters.exists():
            self.lorashelf("cluster", self.out / "private", "--k", str(self.suite.clusters),
                           "--method", "mbc", "--out", clusters, "--plot", self.out / "similarity.png")  # fmt: skip
        self.lorashelf("build", self.out / "private", "--clusters", clusters,
                       "--out", self.out / "mbc")  # fmt: skip

    def gates(self) -> None:
        self.lorashelf("gates", "train", self.out / "private", "--steps", str(self.suite.gate_steps),
                       "--max-examples", str(self.suite.train_examples),
                       "--max-length", str(self.suite.max_length))  # fmt: skip

    def results_file(self, label: str) -> Path:
        slug = re.sub(r"[^a-z0-9.+-]+", "-", label.lower().replace(" + ", "-")).strip("-")
        return self.out / "results" / f"{slug}.json"

    def evaluate(self) -> None:
        tasks = ",".join(self.suite.heldout)
        oracle = ",".join(f"{t}={s}" for t, s in self.suite.heldout.items())
        for label, lib, method in EVALS:
            out = self.results_file(label)
            if out.exists():
                self.console.print(f"[dim]{label}: results exist ({out.name}), skipped[/dim]")
                continue
            argv = ["eval", "--tasks", tasks, "--limit", str(self.suite.eval_limit),
                    "--method", method, "--json", out]  # fmt: skip
            if lib is not None:
                argv.insert(1, self.out / lib)  # the library is the first argument
            if method == "oracle":
                argv += ["--oracle-map", oracle]
            if method == "arrow":
                argv += ["--routing-report", self.out / f"routing-{lib}.json"]
            self.lorashelf(*argv)

    def evaluate_more(self) -> None:
        """The methods of :func:`more_methods` without a results file, in one ``eval``
        whose JSON is then split into one file per method (so each resumes alone)."""
        todo = [
            (label, m)
            for label, m in more_methods(self.suite)
            if not self.results_file(label).exists()
        ]
        if not todo:
            self.console.print("[dim]every other method: results exist (or none), skipped[/dim]")
            return
        both = self.out / "results" / "more.json"
        sets = [f"{k}={v}" for _, m in todo for k, v in CHEAP.get(m, {}).items()]
        self.lorashelf("eval", self.out / "private", "--tasks", ",".join(self.suite.heldout),
                       "--limit", str(self.suite.eval_limit), "--method", ",".join(m for _, m in todo),
                       *[a for kv in sets for a in ("--set", kv)], "--json", both)  # fmt: skip
        data = json.loads(both.read_text())
        entries = {e["method"]: e for e in (data["methods"] if "methods" in data else [data])}
        for label, method in todo:
            self.results_file(label).write_text(json.dumps(entries[method], indent=2))
        both.unlink()

    def genknowsub(self) -> None:
        """A general-knowledge expert on plain text (``data text`` over the suite's
        ``general`` tasks), trained into a copy of the private library, then Arrow with
        GenKnowSub in both variants on that copy."""
        s = self.suite
        todo = [(label, v) for label, v in gks_rows(s) if not self.results_file(label).exists()]
        if not todo:
            self.console.print(
                "[dim]GenKnowSub: results exist (or not in this suite), skipped[/dim]"
            )
            return
        corpus = self.out / "general.jsonl"
        if not corpus.exists():
            self.lorashelf("data", "text", "--tasks", ",".join(s.general["tasks"]),
                           "--max", str(s.general.get("texts", 300)),
                           "--max-chars", str(s.general.get("max_chars", 1200)), "--out", corpus)  # fmt: skip
        lib = self.out / GENERAL_LIBRARY
        if not lib.exists():  # copied whole, then renamed: a crash never leaves half of it
            tmp = lib.with_name(lib.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.out / "private", tmp)
            os.replace(tmp, lib)
            self.console.print(f"[dim]copied {self.out / 'private'} to {lib}[/dim]")
        from lorashelf.library import Library

        with Library.open(lib) as opened:  # the general expert is shaped like the others
            shape = (
                ["--target-modules", ",".join(opened.target_modules)]
                if opened.target_modules
                else []
            )
            shape += ["--rank", str(opened.rank)] if opened.rank is not None else []
        self.lorashelf("train", lib, "--tasks", f"jsonl:{corpus}", "--name", "general",
                       *self.train_opts(), *shape)  # fmt: skip
        for label, variant in todo:
            self.lorashelf("eval", lib, "--tasks", ",".join(s.heldout), "--limit", str(s.eval_limit),
                           "--method", "arrow", "--set", f"gks={variant}",
                           "--set", "gks_experts=general", "--json", self.results_file(label))  # fmt: skip

    def fewshot_file(self, method: str) -> Path:
        return self.results_file(f"fewshot {method}")

    def fewshot(self) -> None:
        """One ``fewshot`` call and results file per few-shot method, so a suite that
        adds a method (``demo-all`` after ``demo``, same directory) runs only that one."""
        s = self.suite
        todo = [m for m in fewshot_methods(s) if not self.fewshot_file(m).exists()]
        if not todo:
            self.console.print("[dim]few-shot: results exist (or none), skipped[/dim]")
            return
        for method in todo:
            self.lorashelf("fewshot", self.out / "private", "--tasks", ",".join(s.heldout),
                           "--shots", str(s.shots), "--seeds", str(s.seeds), "--limit", str(s.eval_limit),
                           "--methods", method, "--budget", str(s.lorahub_budget),
                           "--lora-steps", str(s.lorahub_budget), "--json", self.fewshot_file(method))  # fmt: skip

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("pull model and data", self.pull)
        self.stage("train private experts and the shared expert", self.train)
        self.stage("cluster (MBC) and train cluster experts", self.cluster)
        self.stage("train PHATGOOSE gates", self.gates)
        self.stage("evaluate on held-out tasks", self.evaluate)
        self.stage("every other merge and router, best single expert", self.evaluate_more)
        if self.suite.general:  # a suite without general-knowledge tasks has no such stage
            self.stage("GenKnowSub: a general-knowledge expert, then Arrow", self.genknowsub)
        self.stage("few-shot methods", self.fewshot)
        self.console.print(
            f"serve what it built: lorashelf serve {self.out / 'private'} {self.out / 'mbc'}"
            "  (then open http://127.0.0.1:8000/)"
        )
        timings = self.out / "timings.json"
        previous = json.loads(timings.read_text()) if timings.exists() else {}
        total = dict(previous.get("all_runs", {}))
        for stage, seconds in self.timings.items():
            total[stage] = total.get(stage, 0.0) + seconds
        self.all_runs, self.runs = total, int(previous.get("runs", 0)) + 1
        timings.write_text(json.dumps({"last_run": self.timings, "all_runs": total,
                                       "runs": self.runs}, indent=2))  # fmt: skip
