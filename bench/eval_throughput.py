"""Questions/s of lorashelf's batched multiple-choice scorer against the plain approach.

Plain approach: each (prompt, option) sequence run alone through the full model, with
a full-vocabulary log-softmax over every position (what a straightforward
implementation does). Also shown: the same computation batched, then with the head
evaluated only at option tokens, then with each question's prompt run once and shared
by its options through the KV cache (lorashelf's default), to separate the gains. All three give the same scores (checked here). One run, same machine.

    .venv/bin/python bench/eval_throughput.py [--task bigbench:sports_understanding] [--n 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import home, write_json

from lorashelf.data import load_task
from lorashelf.data.prompt import render
from lorashelf.evaluate.scoring import score_continuations
from lorashelf.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--n", type=int, default=64, help="questions")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    base = load_base("smollm2-135m", home=home(), dtype=torch.bfloat16)
    task = load_task(args.task, home=home())
    examples = task.splits(seed=0).test[: args.n]
    pairs = [(render(ex, base.tokenizer, False), o) for ex in examples for o in ex.options]
    runs = {
        "plain (1 seq, full vocab)": dict(batch_size=1, fast=False),
        "batched, full vocab": dict(batch_size=args.batch_size, fast=False),
        "batched, head at options": dict(batch_size=args.batch_size, share_prompt=False),
        "lorashelf (+ prompt shared by options)": dict(batch_size=args.batch_size),
    }
    score_continuations(base.model, base.tokenizer, pairs[:4], batch_size=4)  # warm-up
    rows, scores = {}, {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        scores[name] = score_continuations(base.model, base.tokenizer, pairs, **kw)
        rows[name] = len(examples) / (time.perf_counter() - t0)
    ref = [s.logprob for s in scores["plain (1 seq, full vocab)"]]
    ours = [s.logprob for s in scores["lorashelf (+ prompt shared by options)"]]
    max_diff = max(abs(a - b) for a, b in zip(ref, ours, strict=True))
    print(f"task {task.id}: {len(examples)} questions, {len(pairs)} (prompt, option) pairs, bf16")
    print(f"{'method':40s} {'questions/s':>12s} {'vs plain':>9s}")
    plain = rows["plain (1 seq, full vocab)"]
    for name, qps in rows.items():
        print(f"{name:40s} {qps:12.2f} {qps / plain:8.2f}x")
    ratio = rows["lorashelf (+ prompt shared by options)"] / plain
    print(f"max |logprob diff| vs plain: {max_diff:.4f} (bf16)")
    print(
        f"RESULT eval_throughput: {ratio:.2f}x questions/s vs plain per-sequence full-vocab scoring"
    )
    write_json(
        args.json,
        {
            "name": "eval_throughput",
            "ratio": ratio,
            "baseline": "plain per-sequence full-vocabulary log-softmax",
            "questions_per_s": rows,
            "max_abs_diff": max_diff,
        },
    )


if __name__ == "__main__":
    main()
