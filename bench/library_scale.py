"""The library at scale: 10,000 experts, listed in well under a second.

Creates a library of N small synthetic experts through the public API
(``Library.add``, rank-2 LoRA on q_proj/v_proj of a 2-layer 64-wide model, so the
numbers measure the store and not the disk's bandwidth), once with ``fsync=False`` for
all N (the bulk-creation fast path) and once with the default durable path for a
sample. It then times: ``Library.open``; ``lorashelf library ls`` in-process (the
handler, output discarded) and as a subprocess, both through the real entry point and
through the handler alone; loading one expert's verified weights and factors; and the
named baseline for listing, reading every ``card.json`` from disk (what a store
without an index would do). Target: ``lorashelf library ls`` under 1 s at 10,000.

    .venv/bin/python bench/library_scale.py [--n 10000] [--quick] [--json OUT] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json
from safetensors.torch import save_file

from lorashelf.library import Library, safe_name

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_sources(root: Path, k: int = 16, layers: int = 2, d: int = 64, r: int = 2) -> list[Path]:
    out = []
    g = torch.Generator().manual_seed(0)
    for s in range(k):
        sd = {}
        for i in range(layers):
            for m, d_out in (("q_proj", d), ("v_proj", d // 2)):
                key = f"base_model.model.model.layers.{i}.self_attn.{m}"
                sd[f"{key}.lora_A.weight"] = torch.randn(r, d, generator=g) * 0.02
                sd[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.02
        path = root / f"src{s}"
        path.mkdir(parents=True)
        save_file(sd, str(path / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": BASE,
               "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        out.append(path)
    return out


def card(i: int) -> dict:
    task = f"synthetic:family_{i % 50}/task_{i}"
    return {"tasks": [task], "source": "train", "init_seed": 0, "train_loss": 1.0,
            "training": {"r": 2, "lr": 1e-3, "steps": 100}, "data_fingerprint": f"fp{i}"}  # fmt: skip


def create(root: Path, sources: list[Path], n: int, *, fsync: bool, start: int = 0) -> float:
    """Add n experts; returns experts per second."""
    from tqdm import tqdm

    lib = Library.open(root, create=True, base_model=BASE, fsync=fsync)
    t0 = time.perf_counter()
    for i in tqdm(
        range(start, start + n), desc=f"add (fsync={fsync})", mininterval=2, file=sys.stderr
    ):
        c = card(i)
        lib.add(sources[i % len(sources)], safe_name(c["tasks"][0]), c)
    rate = n / (time.perf_counter() - t0)
    lib.close()
    return rate


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ls_in_process(root: Path, as_json: bool = False) -> None:
    from lorashelf.cli import build_parser

    argv = ["library", "ls", str(root)] + (["--json"] if as_json else [])
    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        assert args.func(args) == 0


def run_subprocess(code_or_argv: list[str]) -> None:
    subprocess.run(code_or_argv, check=True, stdout=subprocess.DEVNULL)


def read_every_card(root: Path) -> int:
    return sum(
        len(json.loads(p.read_text())["tasks"]) for p in (root / "experts").glob("*/card.json")
    )


def measure(root: Path, repeat: int) -> dict:
    py = sys.executable
    handler_only = (
        "from lorashelf.cli import build_parser\n"
        f"a = build_parser().parse_args(['library', 'ls', {str(root)!r}])\n"
        "a.func(a)\n"
    )
    lib = Library.open(root)
    names = lib.names()
    rng = random.Random(0)
    sample = [rng.choice(names) for _ in range(20)]
    lib.get(sample[0]).lora_factors()  # warm imports
    load_sd = statistics.median(timed(lambda n=n: lib.get(n).state_dict(), 1) for n in sample)
    load_f = statistics.median(timed(lambda n=n: lib.get(n).lora_factors(), 1) for n in sample)
    return {
        "n_experts": len(names),
        "open_s": timed(lambda: Library.open(root).close(), repeat),
        "names_s": timed(lambda: lib.names(), repeat),
        "ls_in_process_s": timed(lambda: ls_in_process(root), repeat),
        "ls_json_in_process_s": timed(lambda: ls_in_process(root, True), repeat),
        "ls_cli_subprocess_s": timed(
            lambda: run_subprocess([py, "-m", "lorashelf", "library", "ls", str(root)]), repeat
        ),  # noqa: E501
        "ls_handler_subprocess_s": timed(lambda: run_subprocess([py, "-c", handler_only]), repeat),
        "python_startup_s": timed(lambda: run_subprocess([py, "-c", "pass"]), repeat),
        "import_torch_s": timed(lambda: run_subprocess([py, "-c", "import torch"]), repeat),
        "load_state_dict_s": load_sd,
        "load_factors_s": load_f,
        "baseline_read_every_card_s": timed(lambda: read_every_card(root), repeat),
    }


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    n = res["n_experts"]
    table = Table(title=f"library at {n:,} experts")
    for col in ("measure", "value", "note"):
        table.add_column(col)
    ms = lambda key: f"{res[key] * 1e3:.{1 if res[key] > 0.01 else 3}f} ms"  # noqa: E731
    sec = lambda key: f"{res[key]:.2f} s"  # noqa: E731
    rows = [
        ("create, fsync=False", f"{res['create_fast_per_s']:.0f} experts/s", "bulk fast path"),
        ("create, durable", f"{res['create_durable_per_s']:.0f} experts/s",
         f"{res['durable_sample']} adds with fsync"),
        ("Library.open", ms("open_s"), "index + one scandir"),
        ("names()", ms("names_s"), ""),
        ("ls (in-process)", ms("ls_in_process_s"), "the handler, table text"),
        ("ls --json (in-process)", ms("ls_json_in_process_s"), ""),
        ("ls (CLI subprocess)", sec("ls_cli_subprocess_s"), "python -m lorashelf library ls"),
        ("ls (handler subprocess)", sec("ls_handler_subprocess_s"), "the CLI minus runtime setup"),
        ("python startup", sec("python_startup_s"), "context"),
        ("import torch", sec("import_torch_s"), "context: the CLI's runtime setup"),
        ("load one expert", ms("load_state_dict_s"), "state_dict, verified"),
        ("load one expert's factors", ms("load_factors_s"), "lora_factors"),
        ("baseline: read every card.json", ms("baseline_read_every_card_s"), "no index"),
    ]  # fmt: skip
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    print(
        f"load average (1 min) at the end: {res['load_average_1m']:.1f} on {os.cpu_count()} cores"
    )
    ratio = res["baseline_read_every_card_s"] / res["ls_in_process_s"]
    print(f"ls via the index (whole handler) vs just reading every card.json: {ratio:.1f}x")
    ok = res["ls_cli_subprocess_s"] < 1.0
    print(f"target `lorashelf library ls` < 1 s at {n:,}: {'met' if ok else 'NOT met'} "
          f"({res['ls_cli_subprocess_s']:.2f} s; handler alone {res['ls_handler_subprocess_s']:.2f} s)")  # fmt: skip
    print(f"RESULT library_scale: `library ls` at {n:,} experts {res['ls_cli_subprocess_s']:.2f} s "
          f"through the CLI (target < 1 s: {'met' if ok else 'NOT met'}), {ratio:.1f}x faster in "
          "process than reading every card.json")  # fmt: skip
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in res.items()}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="1,000 experts")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--durable-sample", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None, help="reuse/keep the library here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = 1000 if args.quick else args.n
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        sources = make_sources(Path(tmp) / "sources")
        root = work / f"lib{n}"
        have = len(Library.open(root)) if (root / "library.json").exists() else 0
        fast = (
            create(root, sources, n - have, fsync=False, start=have) if n > have else float("nan")
        )
        side = Path(tmp) / "durable"
        durable = create(side, sources, args.durable_sample, fsync=True)
        res = {"create_fast_per_s": fast, "create_durable_per_s": durable,
               "durable_sample": args.durable_sample, **measure(root, args.repeat),
               "load_average_1m": os.getloadavg()[0]}  # fmt: skip
    report(res)
    write_json(args.json, {"benchmark": "library_scale", **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
