"""Time to compute every Arrow prototype of libraries of 128, 256 and 1024 experts on
SmolLM2-135M shapes: lorashelf's exact factored SVD against the dense SVD of B @ A and
PEFT's power iteration.

Each library: synthetic rank-4 experts on q_proj (576 -> 576) and v_proj (576 -> 192)
of all 30 layers, 7,680 (expert, module) prototypes per 128 experts (``--model
random:CONFIG`` for other shapes, ``--device`` to compute there). Methods:
lorashelf (thin QRs + r x r SVDs, batched: ``lorashelf.route.arrow_prototypes``);
PEFT's own ``top_right_singular_vec_from_BA`` (15 power-iteration steps, one pair
at a time, as ``create_arrow_model`` runs it); the same power iteration batched over
all pairs (our reimplementation, the fastest way to run PEFT's algorithm); and the
dense SVD of each ``B @ A``. The dense SVD takes about a second per 576 x 576 matrix
on a CPU, so it runs on ``--dense-sample`` pairs (half of each shape) and its total
is extrapolated per shape; ``--dense-sample 0`` runs it on every pair. Accuracy is
the worst |cos| to the dense result on the sampled pairs, and to lorashelf's on all.
PEFT's per-pair loop runs up to ``--peft-max`` experts (one Python call per pair).

    .venv/bin/python bench/arrow_prototypes.py [--experts 128 256 1024] [--dense-sample 24]
        [--peft-max 1024] [--device D] [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from _common import add_model_args, model_config, resolve_device, sync, write_json
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from lorashelf.library.factors import LoraFactors
from lorashelf.route import arrow_prototypes

RANK = 4


def shapes(model: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """Layers and the (d_out, d_in) of q_proj and v_proj of a model config."""
    c = model_config(model)
    d, kv = (
        c["hidden_size"],
        c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
    )
    return c["num_hidden_layers"], {"q_proj": (d, d), "v_proj": (kv, d)}


def make_library(
    n: int, layers: int, shape: dict, device: torch.device, seed: int = 0
) -> list[tuple[str, dict[str, LoraFactors]]]:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        factors = {}
        for layer in range(layers):
            for proj, (d_out, d_in) in shape.items():
                A = torch.randn(RANK, d_in, generator=g) / d_in**0.5
                B = torch.randn(d_out, RANK, generator=g) * 0.02
                factors[f"model.layers.{layer}.self_attn.{proj}"] = LoraFactors(
                    A.to(device), B.to(device), 2.0
                )
        experts.append((f"expert{i:04d}", factors))
    return experts


def power_iteration_batched(A: torch.Tensor, B: torch.Tensor, iters: int = 15) -> torch.Tensor:
    """PEFT's algorithm (v <- A^T B^T B A v, normalised) over a batch of pairs at once."""
    g = torch.Generator().manual_seed(0)
    C = B.mT @ B
    v = torch.randn(A.shape[0], A.shape[2], 1, generator=g).to(A.device)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(iters):
        w = A.mT @ (C @ (A @ v))
        v = w / (w.norm(dim=1, keepdim=True) + 1e-8)
    return v[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, nargs="*", default=[128, 256, 1024])
    ap.add_argument("--dense-sample", type=int, default=24, help="pairs for the dense SVD; 0 = all")
    ap.add_argument("--peft-max", type=int, default=1024, help="largest library PEFT runs on")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    add_model_args(ap, model="random:smollm2-135m")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    layers, shape = shapes(args.model)
    results = [
        one_library(n, layers, shape, device, args.dense_sample, n <= args.peft_max)
        for n in args.experts
    ]
    head = next((r for r in results if r["experts"] == 256), results[0])
    rows = {name: secs for name, secs, *_ in head["rows"]}
    t_ours, t_dense = rows["lorashelf (exact, batched)"], head["t_dense"]
    peft = (
        f", {head['t_peft'] / t_ours:.1f}x faster than PEFT's power iteration"
        if head["t_peft"]
        else ""
    )
    print(
        f"RESULT arrow_prototypes: {head['experts']} experts: lorashelf {t_dense / t_ours:.0f}x "
        f"faster than dense SVD (target >= 20x){peft}; worst |cos| to dense "
        f"{head['worst_ours']:.6f} (PEFT: {head['worst_peft']})"
    )
    write_json(
        args.json,
        {
            "name": "arrow_prototypes",
            "model": args.model,
            "device": str(device),
            "baseline": "dense torch.linalg.svd of B @ A (extrapolated per shape from a sample)",
            "libraries": results,
        },
    )


def one_library(
    n: int, layers: int, shape: dict, device: torch.device, dense_sample: int, with_peft: bool
) -> dict:
    """Every method on one library of ``n`` experts; prints its table."""
    experts = make_library(n, layers, shape, device)
    pairs = [(e, m, f) for e, fs in experts for m, f in fs.items()]
    print(f"\n{n} experts x {layers} layers x {len(shape)} modules = {len(pairs)} prototypes "
          f"on {device}")  # fmt: skip

    def clock(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0

    ours, t_ours = clock(lambda: arrow_prototypes(experts))
    row = {m: {e: i for i, e in enumerate(e for e, fs in experts if m in fs)} for m in ours}
    exact = {(e, m): ours[m][row[m][e]] for e, m, _ in pairs}

    peft_layer = SimpleNamespace(rng_seed=0)  # the only attribute the method reads
    peft, t_peft = {}, None
    if with_peft:
        peft, t_peft = clock(lambda: {
            (e, m): ArrowLoraLinearLayer.top_right_singular_vec_from_BA(peft_layer, f.A, f.B)
            for e, m, f in pairs
        })  # fmt: skip

    def run_batched():
        out = {}
        for proj in shape:
            group = [(e, m, f) for e, m, f in pairs if m.endswith(proj)]
            v = power_iteration_batched(
                torch.stack([f.A for *_, f in group]), torch.stack([f.B for *_, f in group])
            )
            out.update({(e, m): vi for (e, m, _), vi in zip(group, v)})
        return out

    batched, t_batched = clock(run_batched)
    dense, t_dense = dense_svd(pairs, dense_sample, shape, device)
    n_dense = len(dense)

    def worst(approx: dict, ref: dict) -> float:
        return min(abs(float(approx[k].double() @ ref[k].double())) for k in ref)

    rows = [("lorashelf (exact, batched)", t_ours, worst(exact, dense), 1.0)]
    if with_peft:
        rows.append(
            ("PEFT power iteration (per pair)", t_peft, worst(peft, dense), worst(peft, exact))
        )
    rows += [
        ("power iteration, batched", t_batched, worst(batched, dense), worst(batched, exact)),
        (
            f"dense SVD of B@A ({'all' if n_dense == len(pairs) else f'est. from {n_dense}'})",
            t_dense,
            1.0,
            worst(exact, dense),
        ),
    ]
    cols = f"{'seconds':>9s} {'vs ours':>9s} {'worst |cos| dense':>17s} {'worst |cos| ours':>16s}"
    print(f"{'method':38s} {cols}")
    for name, secs, c_dense, c_ours in rows:
        print(f"{name:38s} {secs:9.2f} {secs / t_ours:8.1f}x {c_dense:17.6f} {c_ours:16.6f}")
    if not with_peft:
        print("PEFT's per-pair loop not run at this size (--peft-max)")
    return {
        "experts": n,
        "prototypes": len(pairs),
        "dense_pairs_timed": n_dense,
        "t_dense": t_dense,
        "t_peft": t_peft,
        "worst_ours": worst(exact, dense),
        "worst_peft": (
            f"{worst(peft, dense):.6f} on the sample, {worst(peft, exact):.6f} over all "
            f"{len(pairs)}"
            if with_peft
            else "not run"
        ),
        "rows": rows,
    }


def dense_svd(pairs: list, sample: int, shape: dict, device: torch.device) -> tuple[dict, float]:
    """Top right singular vectors by dense SVD on a per-shape sample; extrapolated time."""
    out, total = {}, 0.0
    for proj in shape:
        group = [p for p in pairs if p[1].endswith(proj)]
        take = group if sample <= 0 else group[:: max(1, len(group) // max(1, sample // 2))]
        take = take if sample <= 0 else take[: max(1, sample // 2)]
        sync(device)
        t0 = time.perf_counter()
        for n, m, f in take:
            out[(n, m)] = torch.linalg.svd(f.B @ f.A, full_matrices=False).Vh[0]
        sync(device)
        total += (time.perf_counter() - t0) * len(group) / len(take)
    return out, total


if __name__ == "__main__":
    main()
