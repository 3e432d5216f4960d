"""Questions/s of lorashelf's batched multiple-choice scorer against the plain approach.

Plain approach: each (prompt, option) sequence run alone through the full model, with
a full-vocabulary log-softmax over every position (what a straightforward
implementation does). Also shown: the same computation batched, then with the head
evaluated only at option tokens, then with each question's prompt run once and shared
by its options through the KV cache (lorashelf's default), to separate the gains. All
give the same scores up to the model dtype's rounding: the speed runs are bf16, where
batch shapes change the rounding, so the same comparison of lorashelf's scorer against
the plain one is repeated in float32 on ``--n-fp32`` questions, where the two must agree
to float32 rounding (target: max |log-prob diff| below 1e-4). One run, same machine.
``--device``/``--model random:CONFIG`` as every speed benchmark (bench/_common.py);
``--task synthetic`` needs no data cache.

    .venv/bin/python bench/eval_throughput.py [--task bigbench:sports_understanding] [--n 64]
        [--n-fp32 32] [--device D] [--model M]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_model_args, load_bench_task, load_model, resolve_device, write_json

from lorashelf.data.prompt import render
from lorashelf.evaluate.scoring import score_continuations

FP32_TARGET = 1e-4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--n", type=int, default=64, help="questions")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-fp32", type=int, default=32, help="questions of the float32 check")
    ap.add_argument("--json", default=None)
    add_model_args(ap)
    args = ap.parse_args()

    device = resolve_device(args.device)
    base = load_model(args.model, device, torch.bfloat16)
    task = load_bench_task(args.task)
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
    del base
    fp32_diff, n_fp32 = fp32_check(args, device, examples[: args.n_fp32])
    print(
        f"task {task.id}: {len(examples)} questions, {len(pairs)} (prompt, option) pairs, bf16, "
        f"{args.model} on {device}"
    )
    print(f"{'method':40s} {'questions/s':>12s} {'vs plain':>9s}")
    plain = rows["plain (1 seq, full vocab)"]
    for name, qps in rows.items():
        print(f"{name:40s} {qps:12.2f} {qps / plain:8.2f}x")
    ratio = rows["lorashelf (+ prompt shared by options)"] / plain
    print(f"max |logprob diff| vs plain: {max_diff:.4f} (bf16)")
    met = "met" if fp32_diff < FP32_TARGET else "NOT met"
    print(
        f"max |logprob diff| vs plain: {fp32_diff:.2e} (float32, {n_fp32} questions; "
        f"target < {FP32_TARGET:g}: {met})"
    )
    print(
        f"RESULT eval_throughput: {ratio:.2f}x questions/s vs plain per-sequence full-vocab "
        f"scoring (bf16); max |logprob diff| {fp32_diff:.1e} in float32 (target < {FP32_TARGET:g})"
    )
    write_json(
        args.json,
        {
            "name": "eval_throughput",
            "ratio": ratio,
            "baseline": "plain per-sequence full-vocabulary log-softmax",
            "questions_per_s": rows,
            "max_abs_diff": max_diff,
            "max_abs_diff_fp32": fp32_diff,
            "questions_fp32": n_fp32,
            "model": args.model,
            "device": str(device),
        },
    )


def fp32_check(args, device: torch.device, examples) -> tuple[float, int]:
    """Max |log-prob difference| of lorashelf's scorer against the plain one, in float32."""
    base = load_model(args.model, device, torch.float32)
    pairs = [(render(ex, base.tokenizer, False), o) for ex in examples for o in ex.options]
    plain = score_continuations(base.model, base.tokenizer, pairs, batch_size=1, fast=False)
    ours = score_continuations(base.model, base.tokenizer, pairs, batch_size=args.batch_size)
    diff = max(abs(a.logprob - b.logprob) for a, b in zip(plain, ours, strict=True))
    return diff, len(examples)


if __name__ == "__main__":
    main()
