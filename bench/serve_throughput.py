"""Serving throughput: ``lorashelf serve`` over HTTP vs PEFT's multi-adapter inference.

A library of ``--experts`` random rank-``--rank`` LoRAs (q_proj, v_proj) is built on the
base model in a temporary directory. ``--requests`` concurrent greedy requests of
``--new-tokens`` tokens, request i using expert i mod E, are sent to ``lorashelf
serve`` (a subprocess on 127.0.0.1, talked to over HTTP from one thread per request).
The same work runs in process with PEFT: (a) one mixed batch,
``generate(..., adapter_names=[...])``; (b) ``set_adapter`` and one request at a time.
Then all requests use Arrow routing (``LIB:arrow``) and then the base model (``LIB``),
for Arrow's time per token against the base model's. Printed: generated tokens/s, the
ratios, p50/p99 latency of the server requests, and how many server answers equal
PEFT's greedy answers token for token (a speed ratio counts only at equal results;
bf16 can flip near-ties). Both sides generate every token of their budget: PEFT with
``eos_token_id=None``, the server with vLLM's ``ignore_eos`` option, so the work is
the same.

    .venv/bin/python bench/serve_throughput.py [--model smollm2-135m|DIR|random:tiny]
        [--library LIB] [--experts 8] [--requests 16] [--new-tokens 32]
        [--device auto|cpu|cuda] [--dtype bf16] [--lora-dtype fp32|model] [--threads N]
        [--json OUT]

The defaults are the issue's acceptance run (SmolLM2 bf16, 8 experts, 16 requests, 32
tokens); check it at small sizes first (``--model random:tiny --experts 2 --requests 4
--new-tokens 4``). ``random:CONFIG`` is saved to a temporary directory for the server.
With ``--library`` its experts are used (and its base model unless ``--model`` is
given); speed does not depend on the adapters' values. One client connection pool is
shared by all request threads (a fresh ``httpx`` client per request costs ~0.1-0.2 s
of TLS setup, which would be counted as server latency). ``--threads`` sets torch's
CPU threads in both the server and PEFT's process (on a shared CPU, torch's default of
one thread per core can make each step many times slower). Ends with a ``RESULT``
line (the JSON of the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from _common import load_model, resolve_device, write_json

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Question: what is the capital of France?\nAnswer:", "Once upon a time",
           "def fibonacci(n):", "The three laws of robotics are"]  # fmt: skip


def build_library(base_dir: str, model, root: Path, n: int, rank: int) -> Path:
    """A library of ``n`` random LoRAs on ``model`` (saved with PEFT, added with lorashelf)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lorashelf.library import Library

    lib = Library.open(root / "lib", create=True, base_model=base_dir)
    for i in range(n):
        peft = get_peft_model(copy.deepcopy(model).float(), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))  # fmt: skip
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5))
        out = root / f"src{i}"
        peft.save_pretrained(str(out))
        cfg = out / "adapter_config.json"
        cfg.write_text(
            json.dumps(json.loads(cfg.read_text()) | {"base_model_name_or_path": base_dir})
        )
        lib.add(out, name=f"e{i}", card={"tasks": [f"task:{i}"], "source": "train"})
    return lib.path


def start_server(lib: Path, args, port: int) -> subprocess.Popen:
    threads = ["--threads", str(args.threads)] if args.threads else []
    cmd = [sys.executable, "-m", "lorashelf", "--device", args.device, *threads, "serve", str(lib),
           "--port", str(port), "--dtype", args.dtype, "--max-batch", str(args.requests),
           "--watch-s", "0", "--lora-dtype", args.lora_dtype]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read().decode()) from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def http_round(
    client: httpx.Client, port: int, models: list[str], prompts: list[str], n_tokens: int
) -> dict:
    """All requests at once, one thread each; wall time, latencies and the answers."""
    results: list[dict] = [{} for _ in models]

    def one(i: int) -> None:
        t0 = time.perf_counter()
        r = client.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600, json={
            "model": models[i], "prompt": prompts[i], "max_tokens": n_tokens, "temperature": 0,
            "logprobs": 0, "ignore_eos": True})  # fmt: skip
        r.raise_for_status()
        body = r.json()
        results[i] = {"latency": time.perf_counter() - t0, "text": body["choices"][0]["text"],
                      "tokens": body["usage"]["completion_tokens"]}  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(models))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    return {"wall": wall, "tokens": sum(r["tokens"] for r in results), "texts": [r["text"] for r in results],
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}  # fmt: skip


def peft_runs(base, tok, lib: Path, names: list[str], prompts: list[str], n_tokens: int) -> dict:
    from peft import PeftModel

    from lorashelf.library import Library

    library = Library.open(lib)
    model = PeftModel.from_pretrained(base, str(library.get(names[0]).path), adapter_name=names[0])
    for n in sorted(set(names) - {names[0]}):
        model.load_adapter(str(library.get(n).path), adapter_name=n)
    model.eval()
    tok.padding_side = "left"
    kw = {"max_new_tokens": n_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id,
          "eos_token_id": None}  # fmt: skip
    dev = next(base.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**enc, adapter_names=names, **kw)
        mixed = time.perf_counter() - t0
        texts = [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]
        t0 = time.perf_counter()
        solo = []
        for n, p in zip(names, prompts):
            model.set_adapter(n)
            one = tok([p], return_tensors="pt").to(dev)
            o = model.generate(**one, **kw)[0, one["input_ids"].shape[1] :]
            solo.append(o)
        loop = time.perf_counter() - t0
    solo_texts = [tok.decode(o, skip_special_tokens=True) for o in solo]
    return {"mixed": mixed, "loop": loop, "texts": texts, "solo_texts": solo_texts}


def base_dir(base, root: Path) -> str:
    """A directory the server can load ``base`` from (``random:`` models are saved)."""
    if not str(base.path).startswith("("):
        return str(base.path)
    out = root / "base"
    base.model.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="smollm2-135m, a local dir or random:CONFIG (default: the library's "
                    "base, else smollm2-135m)")  # fmt: skip
    ap.add_argument("--library", type=Path, default=None, help="serve its experts")
    ap.add_argument("--experts", type=int, default=8, help="random experts (without --library)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lora-dtype", default="fp32", choices=["fp32", "model"],
                    help="the server's LoRA branch: fp32 as PEFT computes adapters (default, "
                    "same numbers), or the model's dtype (faster, rounds differently)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (both sides)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lorashelf.library import Library
    from lorashelf.runtime import resolve_dtype

    device = resolve_device(args.device)
    args.device = str(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    library = Library.open(args.library) if args.library else None
    model = args.model or (library.base_model if library else "smollm2-135m")
    base = load_model(model, device, resolve_dtype(args.dtype, device))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        if library is None:
            lib = build_library(base_dir(base, Path(tmp)), base.model, Path(tmp), args.experts,
                                args.rank)  # fmt: skip
        else:
            lib = library.path
            if args.model:
                raise SystemExit("--model with --library: the server runs the library's base")
        experts = Library.open(lib).names()
        args.experts = len(experts)
        names = [experts[i % len(experts)] for i in range(args.requests)]
        lib_id = Path(lib).resolve().name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(lib, args, port)
        client = httpx.Client(limits=httpx.Limits(max_connections=2 * args.requests))
        try:
            http_round(client, port, [lib_id] * 2, prompts[:2], 2)  # warm-up
            served = http_round(client, port, [f"{lib_id}/{n}" for n in names], prompts,
                                args.new_tokens)  # fmt: skip
            arrow = http_round(client, port, [f"{lib_id}:arrow"] * args.requests, prompts,
                               args.new_tokens)  # fmt: skip
            plain = http_round(client, port, [lib_id] * args.requests, prompts, args.new_tokens)
        finally:
            client.close()
            proc.terminate()
            proc.wait(timeout=30)
        peft = peft_runs(base.model, base.tokenizer, lib, names, prompts, args.new_tokens)
    n_tok = args.requests * args.new_tokens
    same = sum(a == b for a, b in zip(served["texts"], peft["texts"]))
    # how far batching alone moves greedy answers: PEFT's mixed batch against its own
    # one-request-at-a-time loop (in bf16 near-ties flip with the batch's shapes)
    peft_self = sum(a == b for a, b in zip(peft["texts"], peft["solo_texts"]))
    same_solo = sum(a == b for a, b in zip(served["texts"], peft["solo_texts"]))
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "serve_tok_s": served["tokens"] / served["wall"],
        "peft_mixed_tok_s": n_tok / peft["mixed"],
        "peft_loop_tok_s": n_tok / peft["loop"],
        "arrow_tok_s": arrow["tokens"] / arrow["wall"],
        "base_tok_s": plain["tokens"] / plain["wall"],
        "p50_s": served["p50"], "p99_s": served["p99"],
        "answers_equal_to_peft": f"{same}/{args.requests}",
        "answers_equal_to_peft_loop": f"{same_solo}/{args.requests}",
        "peft_mixed_equal_to_peft_loop": f"{peft_self}/{args.requests}",
    }  # fmt: skip
    print(f"{args.requests} requests x {args.new_tokens} tokens, {args.experts} experts, "
          f"{model} {args.dtype} (server LoRA branch: {args.lora_dtype}) on {args.device}")  # fmt: skip
    print(f"  lorashelf serve (HTTP)  {result['serve_tok_s']:9.1f} tok/s   "
          f"p50 {served['p50']:.2f} s  p99 {served['p99']:.2f} s")  # fmt: skip
    print(f"  PEFT mixed batch        {result['peft_mixed_tok_s']:9.1f} tok/s   "
          f"serve / PEFT mixed = {result['serve_tok_s'] / result['peft_mixed_tok_s']:.2f}x (target >= 1)")  # fmt: skip
    print(f"  PEFT set_adapter loop   {result['peft_loop_tok_s']:9.1f} tok/s   "
          f"serve / loop = {result['serve_tok_s'] / result['peft_loop_tok_s']:.2f}x (target >= 3)")  # fmt: skip
    print(
        f"  Arrow vs base time/token: {result['base_tok_s'] / result['arrow_tok_s']:.2f}x "
        "(target <= 1.3)"
    )
    print(f"  server answers equal to PEFT's mixed batch: {result['answers_equal_to_peft']}, "
          f"to its one-at-a-time loop: {same_solo}/{args.requests} (PEFT's mixed batch equal "
          f"to its own loop: {peft_self}/{args.requests})")  # fmt: skip
    print(
        f"RESULT serve_throughput: {result['serve_tok_s'] / result['peft_mixed_tok_s']:.2f}x "
        f"tokens/s vs PEFT's mixed-adapter batch (target >= 1), "
        f"{result['serve_tok_s'] / result['peft_loop_tok_s']:.2f}x vs its set_adapter loop "
        f"(target >= 3), Arrow {result['base_tok_s'] / result['arrow_tok_s']:.2f}x base time "
        f"per token (target <= 1.3), p50 {served['p50']:.2f} s p99 {served['p99']:.2f} s; "
        f"answers equal to PEFT's mixed batch {result['answers_equal_to_peft']}, to its loop "
        f"{same_solo}/{args.requests} (PEFT mixed vs its own loop "
        f"{result['peft_mixed_equal_to_peft_loop']})"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
