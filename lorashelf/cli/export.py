"""``lorashelf export LIB --method M --format peft|gguf --out PATH``: one static adapter
for vLLM/SGLang/LoRAX/PEFT (a PEFT dir) or llama.cpp/Ollama (a GGUF LoRA)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a static composition as a PEFT dir or GGUF LoRA")
    p.add_argument("library", type=Path)
    p.add_argument(
        "--method",
        required=True,
        help="expert:NAME, uniform, uniform-delta, ties, or weights:NAME=0.7,NAME=0.3",
    )
    p.add_argument("--format", required=True, choices=("peft", "gguf"), dest="fmt")
    p.add_argument("--out", type=Path, required=True, help="PEFT dir or .gguf file to write")
    p.add_argument("--target", default=None, choices=("vllm",), help="peft: meet vLLM's rules")
    p.add_argument("--rank", type=int, default=None, help="SVD-truncate to this rank (ties)")
    p.add_argument("--experts", default=None, help="merge: comma-separated subset (default all)")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of entries kept")
    p.add_argument(
        "--mix", default="output", choices=("output", "params"), help="weights: how to combine"
    )
    p.add_argument("--base", default=None, help="gguf: the base model's .gguf (default embedded)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary ('-': stdout)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from lorashelf.export import export_adapter
    from lorashelf.library import Library

    done = export_adapter(
        Library.open(args.library), args.method, args.fmt, args.out, target=args.target,
        rank=args.rank, experts=args.experts.split(",") if args.experts else None,
        density=args.density, mix=args.mix, base=args.base, overwrite=args.overwrite,
    )  # fmt: skip
    err = done.resolved.truncation_error
    line = (
        f"wrote {done.path} ({args.fmt}, {args.method}, rank {done.rank}, {done.modules} "
        f"modules, truncation error {err:.4f})"
    )
    if args.json:
        text = json.dumps(done.summary(), indent=2)
        if args.json == "-":
            print(text)
            print(line, file=sys.stderr)
            return 0
        Path(args.json).write_text(text + "\n")
    print(line)
    for change in done.changes:
        print(f"  {change}")
    if args.fmt == "gguf":
        print(f"  run with: llama-cli -m BASE.gguf --lora {done.path}")
    if args.target == "vllm":
        print(f"  serve with: vllm serve BASE --enable-lora --max-lora-rank {done.rank} "
              f"--lora-modules NAME={done.path}")  # fmt: skip
    return 0
