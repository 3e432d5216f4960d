"""Time to compute every Arrow prototype of a 128-expert library on SmolLM2-135M shapes:
lorashelf's exact factored SVD against the dense SVD of B @ A and PEFT's power iteration.

The library: 128 synthetic rank-4 experts on q_proj (576 -> 576) and v_proj
(576 -> 192) of all 30 layers, 7,680 (expert, module) prototypes. Methods:
lorashelf (thin QRs + r x r SVDs, batched: ``lorashelf.route.arrow_prototypes``);
PEFT's own ``top_right_singular_vec_from_BA`` (15 power-iteration steps, one pair
at a time, as ``create_arrow_model`` runs it); the same power iteration batched over
all pairs (our reimplementation, the fastest way to run PEFT's algorithm); and the
dense SVD of each ``B @ A``. The dense SVD takes about a second per 576 x 576 matrix
on a CPU, so it runs on ``--dense-sample`` pairs (half of each shape) and its total
is extrapolated per shape; ``--dense-sample 0`` runs it on every pair. Accuracy is
the worst |cos| to the dense result on the sampled pairs, and to lorashelf's on all.

    .venv/bin/python bench/arrow_prototypes.py [--experts 128] [--dense-sample 24] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from _common import write_json
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from lorashelf.library.factors import LoraFactors
from lorashelf.route import arrow_prototypes

LAYERS, RANK = 30, 4
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (d_out, d_in) of SmolLM2-135M


def make_library(n: int, seed: int = 0) -> list[tuple[str, dict[str, LoraFactors]]]:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        factors = {}
        for layer in range(LAYERS):
            for proj, (d_out, d_in) in SHAPES.items():
                A = torch.randn(RANK, d_in, generator=g) / d_in**0.5
                B = torch.randn(d_out, RANK, generator=g) * 0.02
                factors[f"model.layers.{layer}.self_attn.{proj}"] = LoraFactors(A, B, 2.0)
        experts.append((f"expert{i:03d}", factors))
    return experts


def power_iteration_batched(A: torch.Tensor, B: torch.Tensor, iters: int = 15) -> torch.Tensor:
    """PEFT's algorithm (v <- A^T B^T B A v, normalised) over a batch of pairs at once."""
    g = torch.Generator().manual_seed(0)
    C = B.mT @ B
    v = torch.randn(A.shape[0], A.shape[2], 1, generator=g)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(iters):
        w = A.mT @ (C @ (A @ v))
        v = w / (w.norm(dim=1, keepdim=True) + 1e-8)
    return v[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--dense-sample", type=int, default=24, help="pairs for the dense SVD; 0 = all")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    experts = make_library(args.experts)
    pairs = [(n, m, f) for n, fs in experts for m, f in fs.items()]
    n_mod = len(SHAPES)
    print(f"{len(experts)} experts x {LAYERS} layers x {n_mod} modules = {len(pairs)} prototypes")

    t0 = time.perf_counter()
    ours = arrow_prototypes(experts)
    t_ours = time.perf_counter() - t0
    row = {m: {n: i for i, n in enumerate(n for n, fs in experts if m in fs)} for m in ours}
    exact = {(n, m): ours[m][row[m][n]] for n, m, _ in pairs}

    peft_layer = SimpleNamespace(rng_seed=0)  # the only attribute the method reads
    t0 = time.perf_counter()
    peft = {
        (n, m): ArrowLoraLinearLayer.top_right_singular_vec_from_BA(peft_layer, f.A, f.B)
        for n, m, f in pairs
    }
    t_peft = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched = {}
    for proj in SHAPES:
        group = [(n, m, f) for n, m, f in pairs if m.endswith(proj)]
        v = power_iteration_batched(
            torch.stack([f.A for *_, f in group]), torch.stack([f.B for *_, f in group])
        )
        batched.update({(n, m): vi for (n, m, _), vi in zip(group, v)})
    t_batched = time.perf_counter() - t0

    dense, t_dense = dense_svd(pairs, args.dense_sample)
    n_dense = len(dense)

    def worst(approx: dict, ref: dict) -> float:
        return min(abs(float(approx[k].double() @ ref[k].double())) for k in ref)

    rows = [
        ("lorashelf (exact, batched)", t_ours, worst(exact, dense), 1.0),
        ("PEFT power iteration (per pair)", t_peft, worst(peft, dense), worst(peft, exact)),
        ("power iteration, batched", t_batched, worst(batched, dense), worst(batched, exact)),
        (
            f"dense SVD of B@A ({'all' if n_dense == len(pairs) else f'est. from {n_dense}'})",
            t_dense,
            1.0,
            worst(exact, dense),
        ),
    ]
    cols = f"{'seconds':>9s} {'vs ours':>9s} {'worst |cos| dense':>17s} {'worst |cos| ours':>16s}"
    print(f"\n{'method':38s} {cols}")
    for name, secs, c_dense, c_ours in rows:
        print(f"{name:38s} {secs:9.2f} {secs / t_ours:8.1f}x {c_dense:17.6f} {c_ours:16.6f}")
    print(
        f"RESULT arrow_prototypes: lorashelf {t_dense / t_ours:.0f}x faster than dense SVD "
        f"(target >= 20x), {t_peft / t_ours:.1f}x faster than PEFT's power iteration; "
        f"worst |cos| to dense {worst(exact, dense):.6f} (PEFT: {worst(peft, dense):.6f} on the "
        f"sample, {worst(peft, exact):.6f} over all {len(pairs)})"
    )
    write_json(
        args.json,
        {
            "name": "arrow_prototypes",
            "prototypes": len(pairs),
            "dense_pairs_timed": n_dense,
            "baseline": "dense torch.linalg.svd of B @ A (extrapolated per shape from a sample)",
            "ratio_vs_dense": t_dense / t_ours,
            "ratio_vs_peft": t_peft / t_ours,
            "rows": [
                {"method": n, "seconds": s, "worst_cos_dense": a, "worst_cos_ours": b}
                for n, s, a, b in rows
            ],
        },
    )


def dense_svd(pairs: list, sample: int) -> tuple[dict, float]:
    """Top right singular vectors by dense SVD on a per-shape sample; extrapolated time."""
    out, total = {}, 0.0
    for proj in SHAPES:
        group = [p for p in pairs if p[1].endswith(proj)]
        take = group if sample <= 0 else group[:: max(1, len(group) // max(1, sample // 2))]
        take = take if sample <= 0 else take[: max(1, sample // 2)]
        t0 = time.perf_counter()
        for n, m, f in take:
            out[(n, m)] = torch.linalg.svd(f.B @ f.A, full_matrices=False).Vh[0]
        total += (time.perf_counter() - t0) * len(group) / len(take)
    return out, total


if __name__ == "__main__":
    main()
