"""``lorashelf demo``: the main job - build a library, reuse it every way, report."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lorashelf.errors import LorashelfError

if TYPE_CHECKING:
    from rich.console import Console

    from lorashelf.demo.suite import Suite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build a library from BIG-bench, reuse it every way, write a report"
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)"
    )
    p.add_argument("--quick", action="store_true", help="the small suite (a few minutes)")
    p.add_argument(
        "--suite",
        default=None,
        help="a shipped suite name (demo: the core story; demo-all: every method; quick; study) "
        "or a suite .json (default: demo, or quick)",
    )
    p.add_argument(
        "--stage",
        default=None,
        help="study suites: rerun only this stage from scratch (pull, train, cluster, build, "
        "gates, evaluate, fewshot) or just rewrite the report (report)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="study suites: the report directory (default: OUT/report)",
    )
    p.set_defaults(func=cmd_demo)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises KeyboardInterrupt for the block,
    so a long run stops the way Ctrl-C stops it: the stage's wall time is recorded and
    the command in flight cleans up. (A shell's background job ignores SIGINT.)"""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def cmd_demo(args: argparse.Namespace) -> int:
    with terminate_as_interrupt():
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from rich.console import Console

    from lorashelf.cli import main
    from lorashelf.demo.pipeline import Demo
    from lorashelf.demo.report import build_report, collect_results
    from lorashelf.demo.suite import load_suite
    from lorashelf.evaluate.table import print_results

    suite = load_suite(args.suite or ("quick" if args.quick else "demo"))
    out = args.out if not args.quick or args.out != Path("demo_out") else Path("demo_out_quick")
    console = Console()
    if suite.study:
        return _study(args, suite, out, console)
    if args.stage or args.report:
        raise LorashelfError(
            f"--stage and --report are for study suites; suite {suite.name!r} runs whole "
            "(it resumes by itself): drop them, or pass --suite study"
        )
    demo = Demo(out=out, suite=suite, home=args.home, run_cli=main, console=console)
    demo.run()
    versions = {p: version(p) for p in ("lorashelf", "torch", "transformers", "peft")}
    versions["python"] = sys.version.split()[0]
    md, page = build_report(demo, "lorashelf " + shlex.join(sys.argv[1:]), versions)
    print_results(
        collect_results(demo), title=f"held-out tasks, suite {suite.name}", console=console
    )
    console.print(f"report: {md} and {page}")
    return 0


def _study(args: argparse.Namespace, suite: Suite, out: Path, console: Console) -> int:
    """A study suite: its stages (or the one ``--stage`` names), then its report."""
    from lorashelf.cli import main
    from lorashelf.demo.study import Study
    from lorashelf.demo.study_report import write_study_report

    study = Study(out=out, suite=suite, home=args.home, run_cli=main, console=console)
    if args.stage != "report":
        study.run(only=args.stage)
    md = write_study_report(
        study, args.report or out / "report", "lorashelf " + shlex.join(sys.argv[1:])
    )
    console.print(f"report: {md}")
    return 0
