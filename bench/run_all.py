"""Run every benchmark in bench/ and rewrite BENCHMARKS.md with what each printed.

Each benchmark measures its ratio against a named baseline within one run; this
runner only collects their output, with the machine and the date, so the numbers in
BENCHMARKS.md always come from one fresh run of the current code.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--quick] [--gpu FILE]

``--gpu FILE`` appends the section bench/gpu.sh wrote on a GPU machine (its own
summary table; the table at the top stays this machine's). ``--only NAME ...`` reruns
those benchmarks and replaces just their sections of an existing ``--out`` (each
section names the date of its own run), then rebuilds the summary table.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

from _common import machine

HERE = Path(__file__).parent
ORDER = [
    "eval_throughput",
    "train_throughput",
    "library_scale",
    "arrow_prototypes",
    "arrow_forward",
    "cluster_scale",
    "lorahub_speed",
    "merge_speed",
    "serve_throughput",
]
# Arguments for this run (a 2-core CPU): WUDI's dense reference costs E * d_out^3 per Adam
# step, so a few steps show time, memory and equality; bench/gpu.sh runs the full 300.
ARGS = {"merge_speed": ["--wudi-steps", "3"], "serve_throughput": ["--threads", "1"]}
# Needs llama-cpp-python and a library (docs/export.md reports its run).
SKIP = {"export_llama_cpp"}


def doc_summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def with_summary(text: str, header_end: str = "\n## ") -> str:
    """``text`` (a BENCHMARKS.md) with a table of every ``RESULT name: ...`` line, placed
    before the first section (an older table is replaced). The lines are the
    benchmarks' own words: ratio, baseline, target."""
    rows = [
        line.removeprefix("RESULT ").split(": ", 1)
        for line in text.splitlines()
        if line.startswith("RESULT ") and ": " in line
    ]
    table = "\n## Summary\n\n| benchmark | result |\n|---|---|\n" + "".join(
        f"| `{name}` | {what.replace('|', '/')} |\n" for name, what in rows
    )
    head, sep, rest = text.partition(header_end)
    if "\n## Summary\n" in head + sep:
        head = head.split("\n## Summary\n", 1)[0]
    if rest.startswith("Summary\n"):  # the table is the first section: drop it
        rest = rest.split(header_end, 1)[1] if header_end in rest else ""
    return head + table + sep + rest


def replace_sections(text: str, sections: list[str]) -> str:
    """``text`` with each ``\n## NAME`` section replaced by the new one of that name
    (appended when it had none); the rest of the file is kept as it was."""
    for section in sections:
        name = section.split("\n## ", 1)[1].split("\n", 1)[0]
        head, sep, rest = text.partition(f"\n## {name}\n")
        if not sep:
            text = text.rstrip("\n") + "\n" + section
            continue
        after = rest.find("\n## ")
        text = head + section.rstrip("\n") + "\n" + (rest[after:] if after >= 0 else "")
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument(
        "--quick", action="store_true", help="pass --quick to benchmarks that accept it"
    )
    ap.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    ap.add_argument(
        "--summary-only", action="store_true", help="only (re)write the summary table of --out"
    )
    ap.add_argument("--gpu", default=None, help="bench/gpu.sh's section to append")
    args = ap.parse_args()
    if args.summary_only:
        Path(args.out).write_text(with_summary(Path(args.out).read_text()))
        return 0
    found = {
        p.stem: p
        for p in HERE.glob("*.py")
        if not p.stem.startswith("_") and p.stem != "run_all" and p.stem not in SKIP
    }
    if args.gpu and not Path(args.gpu).is_file():
        raise SystemExit(f"--gpu {args.gpu}: no such file; run bench/gpu.sh on a GPU first")
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    if args.only:
        names = [n for n in names if n in args.only]
    m = machine()
    parts = [
        "# Benchmarks\n",
        "Every number below was printed by the benchmark itself in a run of `make bench` "
        "(`bench/run_all.py`; `--only NAME` reruns one section, which then names its own "
        "date), each ratio measured in that same run against the named baseline.\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), "
        f"GPU: {m['cuda']}. Date: {m['date']}.\n",
    ]
    failed = []
    for name in names:
        path = found[name]
        cmd = [sys.executable, str(path), *ARGS.get(name, [])]
        if args.quick and "--quick" in path.read_text():
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        secs = time.perf_counter() - t0
        out = proc.stdout.strip()
        print(out[-3000:], flush=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        if proc.returncode != 0:
            failed.append(name)
            out += "\n" + proc.stderr.strip()[-2000:]
        parts.append(
            f"\n## {name}\n\n{doc_summary(path)}\n\n"
            f"`python bench/{path.name}{''.join(' ' + a for a in ARGS.get(name, []))}` - "
            f"{status}, {secs:.0f} s, {m['date']}\n\n```\n{out}\n```\n"
        )
    gpu = "\n" + Path(args.gpu).read_text() if args.gpu else ""
    out_path = Path(args.out)
    if args.only and out_path.is_file():
        text = replace_sections(out_path.read_text(), parts[3:])
    else:
        text = "".join(parts)
    out_path.write_text(with_summary(text) + gpu)
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
