"""TIES over dense deltas at library scale: lorashelf's streaming merge vs the dense approach.

Experts are random r=4 LoRAs shaped like SmolLM2-135M adapters on q_proj (576->576) and
v_proj (576->192) in all 30 layers. lorashelf's ``ties`` (space="delta", scope="global")
builds one module's deltas a block of rows at a time and finds each expert's global
top-20% threshold exactly in two streaming passes. The baseline is the straightforward
dense implementation: every expert's full task vector stacked in one [E, N] array,
``kthvalue`` per row, then trim / elect / disjoint mean on the whole array. Each runs in
a fresh process reporting wall time and peak RSS; both merges must agree. Also timed:
uniform and uniform-delta on the same experts. Then one row per newer merge, each against
a dense reference written here (every delta built, the whole model's [E, N] stack for
DARE-TIES, autograd on the dense objective for WUDI, whose steps ``--wudi-steps`` sets):
dare-ties, dare-linear, core-space (TIES on the cores), core-space-ta (task arithmetic on the cores),
knots and knots-ta (the same two on KnOTS's V blocks) and wudi; each pair must agree. Core Space's TIES depends on the basis: its trim and sign
election are discontinuous, and at 20 rank-4 experts the stacked factors' singular
values come within 2e-4 of each other, so two correct routes to "the" SVD basis (QR +
small SVD, or a full SVD) differ by ~4e-4 there and flip a few decisions. Its dense
reference therefore takes the same basis (``core_basis``, computed the same way) and
applies the paper's definition densely from there: cores ``U^T delta V`` of the dense
deltas, a global [E, N] TIES with ``kthvalue``, ``U M V^T``. Task arithmetic in core
space is basis-invariant, so core-space-ta is checked against the plain dense sum
(tests/merge/test_core_space.py checks TIES against an independent float64 SVD basis
on small, well-conditioned shapes). KnOTS is checked the same two ways, its dense
reference on the blocks of lorashelf's joint SVD (``dense_knots`` says why the blocks
are shared too; tests/merge/test_knots.py checks it against an independent dense SVD
on small shapes). ``--model random:CONFIG`` takes the
shapes of another configuration (bench/_common.py); ``--device cuda`` keeps the experts
and both merges on the GPU, and memory is then the peak of allocated device memory.

    .venv/bin/python bench/merge_speed.py [--experts 20] [--json OUT] [--quick]
        [--device D] [--model M] [--wudi-steps 300]
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


def _deltas(experts: list[dict[str, _F]], m: str) -> torch.Tensor:
    return torch.stack([f[m].scale * f[m].B @ f[m].A for f in experts])


def _elect_mean(kept: torch.Tensor) -> torch.Tensor:
    sign = kept.sum(0).sign()
    agree = (kept.sign() == sign) & (kept != 0)
    return (kept * agree).sum(0) / agree.sum(0).clamp_min(1)


def _dropped(experts: list[dict[str, _F]]) -> tuple[torch.Tensor, list[str]]:
    """Every expert's whole dropped, rescaled task vector: one [E, N] array."""
    from lorashelf.merge.dare import mask_seed

    names = sorted(experts[0])
    parts = []
    for m in names:
        d = _deltas(experts, m)
        masks = [
            torch.bernoulli(
                torch.full((d[e].numel(),), DENSITY),
                generator=torch.Generator().manual_seed(mask_seed(0, m, e)),
            ).view_as(d[e])
            for e in range(len(experts))
        ]
        parts.append((d * torch.stack(masks).to(d.device) / DENSITY).flatten(1))
    return torch.cat(parts, 1), names


def dense_dare_ties(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    """The dropped task vectors, then TIES's sign election and disjoint mean."""
    dropped, names = _dropped(experts)
    return _split(_elect_mean(dropped), experts, names)


def dense_dare_linear(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    """The dropped task vectors, summed (lambda 1)."""
    dropped, names = _dropped(experts)
    return _split(dropped.sum(0), experts, names)


def _split(flat: torch.Tensor, experts, names) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for m in names:
        size = experts[0][m].B.shape[0] * SHAPE["hidden"]
        out[m] = flat[at : at + size].view(-1, SHAPE["hidden"])
        at += size
    return out


def dense_core_space(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    """In the same bases as lorashelf's (see the module docstring): cores from the dense
    deltas, a global TIES on the whole [E, N] stack of cores, dense back-projection."""
    from lorashelf.merge.core_space import core_basis

    names, bases, cores = sorted(experts[0]), {}, []
    for m in names:
        basis = core_basis([f[m] for f in experts], experts[0][m].A.device)
        U, V = bases[m] = basis.U, basis.V
        cores.append((U.T @ _deltas(experts, m) @ V).flatten(1))
    merged = _dense_global_ties(torch.cat(cores, 1))
    out, at = {}, 0
    for m in names:
        U, V = bases[m]
        size = U.shape[1] * V.shape[1]
        out[m] = U @ merged[at : at + size].view(U.shape[1], V.shape[1]) @ V.T
        at += size
    return out


def _dense_global_ties(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` [E, N]: each row trimmed to its top-DENSITY |values| (kthvalue), elect, mean."""
    n = vectors.shape[1]
    k = min(n, max(1, round(DENSITY * n)))
    thr = vectors.abs().kthvalue(n - k + 1, dim=1).values
    return _elect_mean(torch.where(vectors.abs() >= thr[:, None], vectors, 0.0))


def dense_knots(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    """lorashelf's joint SVD (``U S`` and each expert's ``V_t^T`` block), then a global
    TIES on the whole [E, N] stack of blocks and ``U S V_merged^T`` densely. The blocks
    are shared too: ``S^-1 U^T dW_t`` from the dense deltas agrees with them to 1e-7, but
    at 20 experts a block holds ~90k entries per expert whose order statistics near the
    TIES threshold are ~7e-7 apart, so that rounding moves a few entries across it, and
    each moved entry shifts the update by up to ``S_j`` times its size (0.1 here)."""
    from lorashelf.merge.knots import align

    names, bases, blocks = sorted(experts[0]), {}, []
    for m in names:
        a = align([f[m] for f in experts], experts[0][m].A.device)
        bases[m] = a.US
        blocks.append(torch.stack(a.blocks).flatten(1))
    merged, out, at = _dense_global_ties(torch.cat(blocks, 1)), {}, 0
    for m in names:
        size = bases[m].shape[1] * SHAPE["hidden"]
        out[m] = bases[m] @ merged[at : at + size].view(bases[m].shape[1], SHAPE["hidden"])
        at += size
    return out


def dense_sum(experts: list[dict[str, _F]]) -> dict[str, torch.Tensor]:
    """Task arithmetic (lambda 1): the plain sum of the dense deltas."""
    return {m: _deltas(experts, m).sum(0) for m in sorted(experts[0])}


def dense_wudi(experts: list[dict[str, _F]], steps: int) -> dict[str, torch.Tensor]:
    """The paper's objective on dense task vectors, autograd and Adam (lr 1e-5)."""
    out = {}
    for m in sorted(experts[0]):
        taus = _deltas(experts, m)
        norms = taus.flatten(1).square().sum(1)
        tau_m = torch.nn.Parameter(taus.sum(0))
        opt = torch.optim.Adam([tau_m], lr=1e-5)
        for _ in range(steps):
            loss = (((tau_m - taus) @ taus.transpose(1, 2)).square().sum((1, 2)) / norms).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[m] = tau_m.detach()
    return out


def newer_merge(kind: str, experts, wudi_steps: int) -> dict[str, torch.Tensor]:
    from lorashelf.merge import merge

    configs = {
        "dare-ties": {"density": DENSITY},
        "dare-linear": {"density": DENSITY},
        "core-space": {"density": DENSITY},
        "core-space-ta": {"core_merge": "task-arithmetic"},
        "knots": {"density": DENSITY},
        "knots-ta": {"merge_on": "task-arithmetic"},
        "wudi": {"steps": wudi_steps},
    }
    merged = merge(experts, kind.removesuffix("-ta"), configs[kind])
    return {m: merged.delta(m) for m in merged.names()}


NEWER = ("dare-ties", "dare-linear", "core-space", "core-space-ta", "knots", "knots-ta", "wudi")
DENSE_OF = {"dare-ties": dense_dare_ties, "dare-linear": dense_dare_linear,
            "core-space": dense_core_space,
            "core-space-ta": dense_sum, "knots": dense_knots, "knots-ta": dense_sum}  # fmt: skip


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def phase(kind: str, n: int, layers: int, out: Path, device: str, wudi_steps: int) -> dict:
    experts = make_experts(n, layers, device)
    sync(device)
    base_rss = peak_mb(device)
    t0 = time.perf_counter()
    if kind == "dense":
        result = dense_ties(experts)
    elif kind in NEWER:
        result = newer_merge(kind, experts, wudi_steps)
    elif kind == "dense-wudi":
        result = dense_wudi(experts, wudi_steps)
    elif kind.startswith("dense-"):
        result = DENSE_OF[kind.removeprefix("dense-")](experts)
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
    cmd += ["--wudi-steps", str(args.wudi_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--layers", type=int, default=None, help="default: the model's")
    ap.add_argument("--quick", action="store_true", help="8 experts, 8 layers")
    phases = ["ours", "dense", *NEWER, *(f"dense-{k}" for k in NEWER)]
    ap.add_argument("--phase", choices=phases, default=None)
    ap.add_argument("--wudi-steps", type=int, default=300, help="Adam steps of both WUDIs")
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
        result = phase(args.phase, args.experts, args.layers, Path(args.out), args.device,
                       args.wudi_steps)  # fmt: skip
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_phase("ours", args.experts, args.layers, Path(tmp) / "ours.safetensors", args)
        dense = run_phase("dense", args.experts, args.layers, Path(tmp) / "dense.safetensors", args)
        a, b = load_file(f"{tmp}/ours.safetensors"), load_file(f"{tmp}/dense.safetensors")
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        newer = {}
        for kind in NEWER:
            paths = [Path(tmp) / f"{k}.safetensors" for k in (kind, f"dense-{kind}")]
            rows = [run_phase(k, args.experts, args.layers, p, args) for k, p in
                    zip((kind, f"dense-{kind}"), paths)]  # fmt: skip
            x, y = (load_file(str(p)) for p in paths)
            scale = max(float(v.abs().max()) for v in y.values())
            diff = max(float((x[k] - y[k]).abs().max()) for k in x)
            newer[kind] = {"ours": rows[0], "dense": rows[1], "max_diff": diff, "max_abs": scale}
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
    print(f"\n{'newer merges (vs dense reference)':34s} {'ours s':>8s} {'dense s':>8s} "
          f"{'ours MB':>8s} {'dense MB':>8s} {'max diff':>9s} {'max |x|':>8s}")  # fmt: skip
    for kind, row in newer.items():
        o, d = row["ours"], row["dense"]
        extra = [x["peak_mb"] - x["inputs_mb"] for x in (o, d)]
        print(f"{kind:34s} {o['secs']:8.2f} {d['secs']:8.2f} {extra[0]:8.0f} {extra[1]:8.0f} "
              f"{row['max_diff']:9.1e} {row['max_abs']:8.1e}")  # fmt: skip
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
            "newer": newer,
        },
    )


if __name__ == "__main__":
    main()
