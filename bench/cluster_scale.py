"""MBC at library scale: blocked similarity + k-means for 1,000 experts streamed from disk.

Experts are shaped like SmolLM2-135M r=4 LoRA adapters on q_proj (576->576) and v_proj
(576->192) in all 30 layers: 230,400 parameters, 0.9 MB of fp32 each, written as PEFT
adapter dirs with a planted family structure (shared init + family direction + noise).
Writing them is not timed. lorashelf's path (blocked Gram matrix, two resident blocks,
exact truncated SVD from the Gram matrix, k-means on similarity rows) runs in a fresh
process and reports wall time and peak RSS; the baseline is the reference's dense
approach (all flattened vectors stacked in one [n, D] array) in another fresh process.
Both similarity matrices must agree, and a small case checks the blocked computation
against a float64 dense one. Targets: under 60 s and under 2 GB.

    .venv/bin/python bench/cluster_scale.py [--n 1000] [--families 10] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json
from safetensors.torch import load_file, save_file

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 4
PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"


def shapes() -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(LAYERS):
        for m, d_out in (("q_proj", HIDDEN), ("v_proj", KV)):
            out[PREFIX.format(i=i, m=m, ab="A")] = (RANK, HIDDEN)
            out[PREFIX.format(i=i, m=m, ab="B")] = (d_out, RANK)
    return out


def write_experts(root: Path, n: int, families: int, seed: int = 0) -> list[int]:
    """n PEFT adapter dirs under root; returns each expert's planted family."""
    g = torch.Generator().manual_seed(seed)
    shp = shapes()
    init = {
        k: torch.randn(s, generator=g) * 0.02 if "lora_A" in k else torch.zeros(s)
        for k, s in shp.items()
    }
    fams = [
        {k: torch.randn(s, generator=g) * 0.01 for k, s in shp.items()} for _ in range(families)
    ]
    truth = [int(v) for v in torch.randint(families, (n,), generator=g)]
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    for e, fam in enumerate(truth):
        d = root / f"expert_{e:04d}"
        d.mkdir(parents=True)
        sd = {
            k: init[k] + fams[fam][k] + 0.01 * torch.randn(s, generator=g) for k, s in shp.items()
        }
        save_file(sd, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    (root / "truth.json").write_text(json.dumps(truth))
    return truth


def read_factors(path: Path) -> dict:
    """Module path -> LoraFactors of one PEFT dir, with the library's reader."""
    from lorashelf.library.factors import read_lora_factors

    return read_lora_factors(path)


def flat(f: dict) -> torch.Tensor:
    """The dense reference flattening: sorted modules, A then B."""
    return torch.cat([t.reshape(-1).float() for m in sorted(f) for t in (f[m].A, f[m].B)])


def cpu_s() -> float:
    """User + system CPU seconds of this process (steadier than wall time on a shared box)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_ours(root: Path, k: int, block_mb: int) -> dict:
    from lorashelf.cluster import ClusterConfig, ClusterContext, cluster_experts
    from lorashelf.cluster.similarity import SimilarityConfig, parameter_similarity

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    load = lambda name: read_factors(root / name)  # noqa: E731
    cards = {n: {"init_seed": 0} for n in names}
    cfg = ClusterConfig(method="mbc", k=k, seed=0)
    t0, c0 = time.perf_counter(), cpu_s()
    ctx = ClusterContext(names, cards, load, block_mb=block_mb)
    sim = ctx.parameter_similarity(cfg)
    t1 = time.perf_counter()
    c = cluster_experts(ctx, cfg)
    t2, c2 = time.perf_counter(), cpu_s()
    save_file({"sim": sim.matrix}, str(root / "sim_ours.safetensors"))
    # small case: blocked (several block sizes) vs float64 dense on the first 48 experts
    small = names[:48]
    x = torch.stack([flat(load(n)).double() for n in small])
    k_drop = int(0.5 * x.shape[1])
    for row in x:
        row[row.abs().argsort()[:k_drop]] = 0
    dense = x @ x.T
    dense = dense / dense.diagonal().sqrt()[:, None] / dense.diagonal().sqrt()[None, :]
    small_diff = 0.0
    for b in (1, 7, 16, 48):
        got = parameter_similarity(small, load, SimilarityConfig(0.5, None, block_size=b)).matrix
        small_diff = max(small_diff, float((got - dense).abs().max()))
    return {
        "similarity_s": t1 - t0,
        "kmeans_s": t2 - t1,
        "total_s": t2 - t0,
        "cpu_s": c2 - c0,
        "peak_rss_mb": peak_rss_mb(),
        "labels": c.labels,
        "svd_energy": sim.svd_energy,
        "param_dim": sim.dim,
        "small_case_max_abs_diff": small_diff,
    }


def phase_dense(root: Path, k: int) -> dict:
    """The reference's way: every flattened vector in one dense array."""
    from lorashelf.cluster.embed import sparsify_
    from lorashelf.cluster.kmeans import kmeans
    from lorashelf.cluster.similarity import similarity_from_gram

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    t0, c0 = time.perf_counter(), cpu_s()
    rows = []
    for n in names:
        rows.append(sparsify_(flat(read_factors(root / n)), 0.5))
    x = torch.stack(rows)
    del rows
    gram = (x @ x.T).double()
    sim, _, _ = similarity_from_gram(gram, 64)
    km = kmeans(sim, k, seed=0)
    t1, c1 = time.perf_counter(), cpu_s()
    save_file({"sim": sim}, str(root / "sim_dense.safetensors"))
    return {
        "total_s": t1 - t0,
        "cpu_s": c1 - c0,
        "peak_rss_mb": peak_rss_mb(),
        "labels": km.labels.tolist(),
    }


def run_phase(name: str, root: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--root",
        str(root),
        "--families",
        str(args.families),
        "--block-mb",
        str(args.block_mb),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="experts")
    ap.add_argument("--families", type=int, default=10, help="planted clusters (= k)")
    ap.add_argument("--block-mb", type=int, default=512, help="memory for the two blocks")
    ap.add_argument("--quick", action="store_true", help="200 experts")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        fn = phase_ours if args.phase == "ours" else phase_dense
        extra = (args.block_mb,) if args.phase == "ours" else ()
        print(json.dumps(fn(Path(args.root), args.families, *extra)))
        return
    n = 200 if args.quick else args.n
    from lorashelf.cluster.metrics import adjusted_rand_index

    with tempfile.TemporaryDirectory(prefix="cluster_scale_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        truth = write_experts(root, n, args.families)
        write_s = time.perf_counter() - t0
        ours = run_phase("ours", root, args)
        dense = None if args.skip_dense else run_phase("dense", root, args)
        sim_ours = load_file(str(root / "sim_ours.safetensors"))["sim"]
        diff = None
        if dense:
            diff = float(
                (sim_ours - load_file(str(root / "sim_dense.safetensors"))["sim"]).abs().max()
            )
    ari = adjusted_rand_index(ours["labels"], truth)
    summary(n, ours, dense, diff, ari, write_s, args)


def summary(n: int, ours: dict, dense: dict | None, diff, ari: float, write_s: float, args) -> None:
    mb = n * ours["param_dim"] * 4 / 2**20
    print(
        f"{n} experts x {ours['param_dim']:,} params ({mb:.0f} MB fp32 on disk, written in "
        f"{write_s:.1f} s, not timed); k={args.families}, sparsity 0.5, SVD 64, "
        f"block memory {args.block_mb} MB; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    print(f"{'method':36s} {'wall s':>7s} {'CPU s':>7s} {'peak RSS MB':>12s}")
    rows = [("lorashelf (blocked Gram, streamed)", ours)]
    if dense:
        rows.append(("dense [n, D] array (reference way)", dense))
    for name, r in rows:
        print(f"{name:36s} {r['total_s']:7.1f} {r['cpu_s']:7.1f} {r['peak_rss_mb']:12.0f}")
    print(
        f"lorashelf wall: similarity {ours['similarity_s']:.1f} s, k-means {ours['kmeans_s']:.1f} s"
    )
    if dense:
        print(f"max |sim diff| blocked vs dense: {diff:.2e}")
    print(
        f"small case (48 experts, block sizes 1/7/16/48) max |diff| vs float64 dense: "
        f"{ours['small_case_max_abs_diff']:.2e}"
    )
    energy = ours["svd_energy"]
    svd = f"SVD energy kept: {energy:.3f}" if energy is not None else "no SVD (n <= 64)"
    print(f"ARI vs planted families: {ari:.3f}; {svd}")
    ok = ours["total_s"] < 60 and ours["peak_rss_mb"] < 2048
    ratio = dense["peak_rss_mb"] / ours["peak_rss_mb"] if dense else float("nan")
    print(
        f"RESULT cluster_scale: {ours['total_s']:.1f} s, {ours['peak_rss_mb']:.0f} MB peak for {n} "
        f"experts ({'within' if ok else 'OUTSIDE'} 60 s / 2 GB)"
        + (f"; {ratio:.2f}x less peak memory than the dense array" if dense else "")
    )
    write_json(
        args.json,
        {
            "name": "cluster_scale",
            "n": n,
            "ours": {k: v for k, v in ours.items() if k != "labels"},
            "dense": dense and {k: v for k, v in dense.items() if k != "labels"},
            "max_abs_diff_vs_dense": diff,
            "ari_vs_planted": ari,
            "memory_ratio_vs_dense": ratio,
            "baseline": "dense [n, D] array",
            "load_average": os.getloadavg()[0],
        },
    )


if __name__ == "__main__":
    main()
