"""TIES over dense deltas at library scale: lorashelf's streaming merge vs the dense approach.

Experts are random r=4 LoRAs shaped like SmolLM2-135M adapters on q_proj (576->576) and
v_proj (576->192) in all 30 layers. lorashelf's ``ties`` (space="delta", scope="global")
builds one module's deltas a block of rows at a time and finds each expert's global
top-20% threshold exactly in two streaming passes. The baseline is the straightforward
dense implementation: every expert's full task vector stacked in one [E, N] array,
``kthvalue`` per row, then trim / elect / disjoint mean on the whole array. Each runs in
a fresh process reporting wall time and peak RSS; both merges must agree. Also timed:
uniform and uniform-delta on the same experts. ``--model random:CONFIG`` takes the
shapes of another configuration (bench/_common.py); ``--device cuda`` keeps the experts
and both merges on the GPU, and memory is then the peak of allocated device memory.

    .venv/bin/python bench/merge_speed.py [--experts 20] [--json OUT] [--quick]
        [--device D] [--model M]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import add_model_args, model_config, resolve_device, sync, write_json
from safetensors.torch import load_file, save_file

RANK, DENSITY = 4, 0.2
SHAPE: dict[str, int] = {}  # hidden and kv width of --model, set in main


class _F:
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.A, self.B, self.scale = a, b, scale


def make_experts(n: int, layers: int, device: str = "cpu", seed: int = 0) -> list[dict[str, _F]]:
    g = torch.Generator().manual_seed(seed)
    hidden, kv = SHAPE["hidden"], SHAPE["kv"]
    mods = {
        f"model.layers.{i}.self_attn.{m}": d_out
        for i in range(layers)
        for m, d_out in (("q_proj", hidden), ("v_proj", kv))
    }
    return [
        {
            m: _F(
                0.02 * torch.randn(RANK, hidden, generator=g).to(device),
                torch.randn(d, RANK, generator=g).to(device),
                2.0,
            )
            for m, d in mods.items()
        }
        for _ in range(n)
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dense_ties(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    names = sorted(experts[0])
    vectors = torch.stack(
        [torch.cat([(f[m].scale * f[m].B @ f[m].A).flatten() for m in names]) for f in experts]
    )
    n = vectors.shape[1]
    k = min(n, max(1, round(DENSITY * n)))
    thr = vectors.abs().kthvalue(n - k + 1, dim=1).values
    kept = torch.where(vectors.abs() >= thr[:, None], vectors, 0.0)
    sign = kept.sum(0).sign()
    agree = (kept.sign() == sign) & (kept != 0)
    merged = (kept * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, at = {}, 0
    for m in names:
        size = experts[0][m].B.shape[0] * SHAPE["hidden"]
        out[m] = merged[at : at + size].view(-1, SHAPE["hidden"])
        at += size
    return out


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def phase(kind: str, n: int, layers: int, out: Path, device: str) -> dict:
    experts = make_experts(n, layers, device)
    sync(device)
    base_rss = peak_mb(device)
    t0 = time.perf_counter()
    if kind == "dense":
        result = dense_ties(experts)
    else:
        from lorashelf.merge import TiesConfig, merge

        merged = merge(experts, "ties", TiesConfig(density=DENSITY))
        result = {m: merged.delta(m) for m in merged.names()}
    sync(device)
    secs = time.perf_counter() - t0
    save_file({k: v.contiguous().cpu() for k, v in result.items()}, str(out))
    timings = {}
    if kind == "ours":
        from lorashelf.merge import merge

        for method in ("uniform", "uniform-delta"):
            t1 = time.perf_counter()
            merge(experts, method)
            sync(device)
            timings[method] = time.perf_counter() - t1
    return {"secs": secs, "peak_mb": peak_mb(device), "inputs_mb": base_rss, "other": timings}


def run_phase(kind: str, n: int, layers: int, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", kind, "--experts", str(n), "--layers", str(layers)]
    cmd += ["--out", str(out), "--device", args.device, "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--layers", type=int, default=None, help="default: the model's")
    ap.add_argument("--quick", action="store_true", help="8 experts, 8 layers")
    ap.add_argument("--phase", choices=["ours", "dense"], default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    add_model_args(ap, model="random:smollm2-135m")
    args = ap.parse_args()
    config = model_config(args.model)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    SHAPE.update(hidden=config["hidden_size"], kv=config["hidden_size"] // heads * kv_heads)
    args.layers = args.layers or config["num_hidden_layers"]
    if args.quick:
        args.experts, args.layers = 8, 8
    args.device = str(resolve_device(args.device))
    if args.phase:
        print(json.dumps(phase(args.phase, args.experts, args.layers, Path(args.out), args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_phase("ours", args.experts, args.layers, Path(tmp) / "ours.safetensors", args)
        dense = run_phase("dense", args.experts, args.layers, Path(tmp) / "dense.safetensors", args)
        a, b = load_file(f"{tmp}/ours.safetensors"), load_file(f"{tmp}/dense.safetensors")
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    n_params = sum(v.numel() for v in a.values())
    print(
        f"{args.experts} experts x {len(a)} modules ({n_params / 1e6:.1f}M delta entries each), "
        f"{args.model} shapes on {args.device}"
    )
    memory = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"{'':34s} {'seconds':>8s} {memory:>12s}")
    print(f"{'dense baseline ([E, N] array)':34s} {dense['secs']:8.2f} {dense['peak_mb']:12.0f}")
    print(f"{'lorashelf ties (streamed)':34s} {ours['secs']:8.2f} {ours['peak_mb']:12.0f}")
    print(f"time ratio (dense / lorashelf): {dense['secs'] / ours['secs']:.2f}x")
    extra_dense = dense["peak_mb"] - dense["inputs_mb"]
    extra_ours = ours["peak_mb"] - ours["inputs_mb"]
    print(
        f"working memory above the inputs: dense {extra_dense:.0f} MB, lorashelf {extra_ours:.0f} MB"
    )
    for method, secs in ours["other"].items():
        print(f"{method}: {secs:.3f} s")
    print(f"max |difference| between the two merges: {worst:.2e}")
    print(f"RESULT merge_speed: TIES over {args.experts} experts, {dense['secs'] / ours['secs']:.2f}x "
          f"faster and {extra_dense / max(extra_ours, 1):.1f}x less working memory than the dense "
          f"[E, N] array ({extra_ours:.0f} vs {extra_dense:.0f} MB); max diff {worst:.1e}")  # fmt: skip
    write_json(
        args.json,
        {
            "experts": args.experts,
            "model": args.model,
            "device": args.device,
            "ours": ours,
            "dense": dense,
            "max_diff": worst,
        },
    )


if __name__ == "__main__":
    main()
