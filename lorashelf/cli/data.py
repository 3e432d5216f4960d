"""``lorashelf data pull|ls|show|text``: fetch BIG-bench, list tasks, look at examples,
make a plain-text corpus (what general-knowledge experts for GenKnowSub train on)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from lorashelf.cli.args import positive_int
from lorashelf.cli.convention import add_json_arg, emit_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="tasks: pull, ls, show, text")
    verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)

    pull = verbs.add_parser("pull", help="download and unpack a task collection")
    pull.add_argument("source", choices=["bigbench"], help="the collection to pull")
    pull.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        default=None,
        help="glob(s) over task names, e.g. sports_understanding 'logical_deduction*'",
    )
    pull.add_argument("--sdist", type=Path, default=None, help="a local bigbench-1.0.0.tar.gz")
    pull.add_argument("--index-url", default="https://pypi.org/simple", help="PyPI simple index")
    pull.set_defaults(func=cmd_pull, needs_runtime=False)

    ls = verbs.add_parser("ls", help="list known tasks")
    ls.add_argument("--source", default=None, help="only this source, e.g. bigbench")
    ls.add_argument("--kind", choices=["mc", "gen"], default=None)
    add_json_arg(ls, "the list")
    ls.set_defaults(func=cmd_ls, needs_runtime=False)

    show = verbs.add_parser("show", help="print a task's rendered examples")
    show.add_argument("task", help="task id, e.g. bigbench:sports_understanding")
    show.add_argument("--n", type=positive_int, default=3, help="how many examples (default 3)")
    show.add_argument("--split", default="test", help="train, valid, test or all")
    show.add_argument("--seed", type=int, default=0, help="split seed")
    show.set_defaults(func=cmd_show, needs_runtime=False)

    text = verbs.add_parser(
        "text",
        help="a plain-text JSONL from tasks' inputs (to train general-knowledge experts on)",
        description='Write tasks\' input texts as {"input": "", "target": TEXT} rows: '
        "train a GenKnowSub general expert on it with `lorashelf train LIB --tasks "
        "jsonl:OUT --name general`.",
    )
    text.add_argument("--tasks", required=True, help="comma-separated task ids")
    text.add_argument("--out", type=Path, required=True, help="the .jsonl to write")
    text.add_argument("--max", type=positive_int, default=500, help="at most N texts (500)")
    text.add_argument("--max-chars", type=positive_int, default=1200,
                      help="cut each text to this many characters (1200)")  # fmt: skip
    text.add_argument("--split", default="train", help="train (default), valid, test or all")
    text.add_argument("--seed", type=int, default=0, help="split seed")
    text.set_defaults(func=cmd_text, needs_runtime=False)


def cmd_pull(args: argparse.Namespace) -> int:
    import time

    from lorashelf.data import list_tasks, pull_bigbench

    start = time.perf_counter()
    path = pull_bigbench(args.home, only=args.only, index_url=args.index_url, sdist=args.sdist)
    n = len(list_tasks(args.home, source="bigbench"))
    print(f"bigbench: {n} tasks in {path} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorashelf.data import list_tasks

    rows = list_tasks(args.home, source=args.source, kind=args.kind)
    if emit_json(args, [asdict(r) for r in rows]):
        return 0
    console = Console()
    table = Table(title=f"{len(rows)} tasks")
    id_width = max([len(r.id) for r in rows] + [2])
    # rich 15 collapses whole columns of an over-wide table: fit descriptions ourselves
    room = max(console.width - id_width - 4 - 8 - 13, 12)
    for col in ("id", "kind", "examples", "description"):
        table.add_column(col, justify="right" if col == "examples" else "left", overflow="fold")
    for r in rows:
        desc = r.description if len(r.description) <= room else r.description[: room - 1] + "…"
        table.add_row(r.id, r.kind, str(r.n_examples), desc)
    console.print(table)
    if not rows and args.source is None and args.kind is None:
        console.print("no tasks yet: run `lorashelf data pull bigbench` (see --only)", markup=False)
    print(f"{len(rows)} tasks")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from lorashelf.data import load_task

    task = load_task(args.task, home=args.home)
    examples = task.splits(seed=args.seed).get(args.split)[: max(args.n, 0)]
    console = Console()
    console.print(
        Text(f"{task.id}: {task.kind}, {len(task.examples)} examples. {task.description}")
    )
    for i, ex in enumerate(examples):
        body = Text(ex.prompt, style="bold")
        answers = ex.options if ex.is_mc else ex.targets or (ex.target,)
        for j, a in enumerate(answers):
            gold = (j == ex.answer) if ex.is_mc else True
            body.append(f"\n{'*' if gold else ' '} {a!r}", style="green" if gold else "")
        console.print(Panel(body, title=f"{args.split} example {i}", title_align="left"))
    return 0


def cmd_text(args: argparse.Namespace) -> int:
    from lorashelf.data.text import plain_texts, write_text_corpus

    tasks = [t for t in args.tasks.split(",") if t]
    texts = plain_texts(tasks, args.home, n=args.max, max_chars=args.max_chars,
                        split=args.split, seed=args.seed)  # fmt: skip
    path = write_text_corpus(args.out, texts)
    chars = sum(len(t) for t, _ in texts)
    print(f"{len(texts)} texts ({chars:,} characters) from {', '.join(tasks)} -> {path}")
    return 0
