"""LoraHub on SmolLM2-135M: lorashelf's composition vs a re-implementation of the reference
loop, with the same experts, shots, optimiser and seed.

The reference (sail-sg/lorahub ``get_score``) scores one candidate at a time: it sums
the experts' LoRA state dicts with the candidate's weights, loads the sum with PEFT's
``set_peft_model_state_dict`` and runs the shots through the model with labels (logits
at every position), then adds ``0.05 * mean|w|`` to loss / number of shots.
lorashelf attaches the experts once as a mixture and scores a whole CMA-ES generation
in one batched forward pass, the LM head only at target positions. Both drive the same
CMA-ES (``cma`` package, same seed, whole generations asked), so equal losses give
equal trajectories; the table gives the wall time per candidate, the final losses, and
where (if anywhere) rounding made the two trajectories part. lorashelf runs the
shots' common prompt prefix once per candidate (``--layout prefix``, the default
``auto`` picks it here; ``padded`` feeds the reference's batch). Each search runs
``--repeats`` times, alternating, and the fastest run of each counts.

The *floor* lines time the bare base model (no LoRA, no LM head) on the same tokens,
12 candidates per pass: no exact method on this machine scores a candidate faster
than the floor of the tokens it feeds, so ``reference s/cand / floor`` bounds the
speed-up any LoRA implementation can reach here. PEFT keeps adapter weights
in float32 over a bf16 base and runs the LoRA branch in float32; lorashelf's scorer does
the same by default (``--lora-dtype float32``), so the per-candidate losses agree to
bf16 rounding of the base matmuls, which still depends on batch shapes (a population of
60 sequences against 5). ``--lora-dtype model`` runs the branch in bf16 (faster, rounds
differently); ``--dtype fp32`` removes all rounding differences.

Experts: the first E experts of ``--library DIR`` if given, else E random rank-4 LoRAs
on q/k/v/o_proj of every layer, scaled like trained ones (A from the trainer's init
``U(+-1/sqrt(d_in))``, B ~ N(0, 0.01), alpha 8). Shots: 5 from BIG-bench
logical_deduction/three_objects (train split; ``--task`` for another).

``--device``/``--model random:CONFIG`` as every speed benchmark (bench/_common.py);
``--task synthetic`` needs no data cache.

    .venv/bin/python bench/lorahub_speed.py [--experts 20] [--budget 40] [--json OUT] [--quick]
        [--device D] [--model M] [--task T]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import add_model_args, load_bench_task, load_model, resolve_device, sync, write_json
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from lorashelf.compose import ComposeConfig, compose, draw_shots, encode_shots
from lorashelf.compose.layout import choose_layout
from lorashelf.compose.optimisers import CmaSearch
from lorashelf.compose.scoring import feed
from lorashelf.library import Library, LoraFactors

TASK = "bigbench:logical_deduction/three_objects"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA = 4, 8


def random_experts(model: torch.nn.Module, n: int, seed: int = 0) -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]
    experts = []
    for e in range(n):
        fs = {}
        for name, m in linears:
            bound = 1 / math.sqrt(m.in_features)
            A = torch.empty(RANK, m.in_features).uniform_(-bound, bound, generator=g)
            B = 0.01 * torch.randn(m.out_features, RANK, generator=g)
            fs[name] = LoraFactors(A.to(device), B.to(device), ALPHA / RANK)
        experts.append((f"random{e:02d}", fs))
    return experts


def library_experts(path: Path, n: int) -> list[tuple[str, dict]]:
    lib = Library.open(path)
    names = lib.names()[:n]
    return [(name, lib.get(name).lora_factors(dtype=torch.float32)) for name in names]


class ReferenceLoop:
    """sail-sg/lorahub's scoring, for a causal LM: merge, load, full forward, HF loss."""

    def __init__(self, model, tok, experts, shots, l1: float) -> None:
        scales = {f.scale for _, fs in experts for f in fs.values()}
        ranks = {f.rank for _, fs in experts for f in fs.values()}
        assert len(scales) == 1 and len(ranks) == 1, "the reference needs one rank and alpha"
        r, scale = ranks.pop(), scales.pop()
        targets = sorted({m.rsplit(".", 1)[-1] for _, fs in experts for m in fs})
        cfg = LoraConfig(r=r, lora_alpha=scale * r, target_modules=targets, lora_dropout=0.0)
        self.model = get_peft_model(copy.deepcopy(model), cfg).eval()
        self.cache = [
            {
                f"base_model.model.{m}.lora_{ab}.weight": getattr(f, ab)
                for m, f in fs.items()
                for ab in ("A", "B")
            }  # fmt: skip
            for _, fs in experts
        ]
        self.batch = reference_batch(tok, shots, next(model.parameters()).device)
        self.n, self.l1 = len(shots), l1

    @torch.no_grad()
    def score(self, w: np.ndarray) -> dict:
        merged = {}
        for i, sd in enumerate(self.cache):
            for key, t in sd.items():
                merged[key] = w[i] * t if i == 0 else merged[key] + w[i] * t
        set_peft_model_state_dict(self.model, merged)
        ce = float(self.model(**self.batch).loss) / self.n
        return {"loss": ce + self.l1 * float(np.abs(w).mean()), "ce": ce, "weights": w.tolist()}

    def search(self, config: ComposeConfig) -> list[dict]:
        opt = CmaSearch(len(self.cache), config)
        trace: list[dict] = []
        while len(trace) < config.budget:
            xs = opt.ask()[: config.budget - len(trace)]
            scored = [self.score(np.clip(x, *config.bounds)) for x in xs]
            opt.tell(xs, [s["loss"] for s in scored])
            trace += scored
        return trace


def reference_batch(tok, shots, device) -> dict[str, torch.Tensor]:
    """The reference's labelled batch: prompt + target + EOS, labels -100 off the target."""
    batch = encode_shots(tok, shots, max_length=None)
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.rows, batch.cols + 1] = batch.labels
    return {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "labels": labels.to(device),
    }


@torch.no_grad()
def floor_seconds(model, tok, shots, layout: str, population: int = 12, repeats: int = 2) -> float:
    """Seconds per candidate of the bare base model (no LoRA, no head) on the tokens
    ``layout`` feeds, ``population`` candidates per pass, best of ``repeats``."""
    lay = choose_layout(encode_shots(tok, shots, max_length=None), layout)
    best = math.inf
    device = next(model.parameters()).device
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        feed(model.model, lay, population)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / population)
    return best


def shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and np.array_equal(a[n]["weights"], b[n]["weights"]):
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--library", type=Path, default=None, help="use this library's experts")
    ap.add_argument(
        "--dtype", default="bf16", choices=("bf16", "fp32"),
        help="model dtype; in bf16 the two LoRA paths round differently (see the docstring)",
    )  # fmt: skip
    ap.add_argument(
        "--lora-dtype", default="float32", choices=("float32", "model"),
        help="lorashelf's LoRA-branch precision while scoring (float32: as PEFT)",
    )  # fmt: skip
    ap.add_argument(
        "--layout", default="auto", choices=("auto", "prefix", "padded"),
        help="how lorashelf feeds each candidate's shots (see lorashelf.compose.layout)",
    )  # fmt: skip
    ap.add_argument("--task", default=TASK, help="the task the shots come from")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each search (fastest counts)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="budget 12 (one CMA-ES generation)")
    add_model_args(ap)
    args = ap.parse_args()
    # nevergrad hands scipy's COBYLA a radius scipy corrects, with a warning (warm-up only)
    warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)
    budget = 12 if args.quick else args.budget

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = resolve_device(args.device)
    base = load_model(args.model, device, dtype)
    model, tok = base.model, base.tokenizer
    shots = draw_shots(load_bench_task(args.task), args.shots, args.seed)
    experts = (
        library_experts(args.library, args.experts)
        if args.library
        else random_experts(model, args.experts, args.seed)
    )
    config = ComposeConfig(
        budget=budget, seed=args.seed, optimizer="cma", lora_dtype=args.lora_dtype,
        layout=args.layout,
    )  # fmt: skip
    ref = ReferenceLoop(model, tok, experts, shots, config.l1)
    # warm both paths up: the reference has one batch shape, lorashelf one per
    # population size and pass, so it runs the whole search once
    ref.score(np.zeros(len(experts)))
    compose(model, tok, experts, shots, config)

    load0 = os.getloadavg()[0]
    t_ours = t_ref = math.inf
    for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both
        t0 = time.perf_counter()
        ours = compose(model, tok, experts, shots, config)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref_trace = ref.search(config)
        t_ref = min(t_ref, time.perf_counter() - t0)
    layout = choose_layout(encode_shots(tok, shots, max_length=None), args.layout)
    floors = {name: floor_seconds(model, tok, shots, name) for name in ("padded", layout.name)}
    load1 = os.getloadavg()[0]
    # the scorers themselves, free of CMA-ES's sensitivity: every candidate lorashelf
    # scored, scored again by the reference
    replay = [ref.score(np.asarray(t["weights"]))["loss"] for t in ours.trace]
    replay_diff = max(abs(a - t["loss"]) for a, t in zip(replay, ours.trace))
    ours_best = min(range(len(replay)), key=lambda i: ours.trace[i]["loss"])
    ref_best = min(ref_trace, key=lambda t: t["loss"])
    prefix = shared_prefix(ours.trace, ref_trace)
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ours.trace[:prefix], ref_trace)]
    per_ours, per_ref = t_ours / ours.evaluations, t_ref / len(ref_trace)

    print(f"{len(experts)} experts (rank {RANK}, {'library' if args.library else 'random'}), "
          f"{args.shots} shots of {args.task}, budget {budget}, seed {args.seed}, {args.dtype} "
          f"(LoRA branch {args.lora_dtype}), {args.model} on {device}, "
          f"torch threads {torch.get_num_threads()}, load avg {load0:.1f} -> {load1:.1f}")  # fmt: skip
    print(f"{'method':<34}{'cands':>6}{'passes':>7}{'s/cand':>9}{'total s':>9}{'final loss':>12}")
    print(f"{'reference (merge+load, 1 by 1)':<34}{len(ref_trace):>6}{len(ref_trace):>7}"
          f"{per_ref:>9.3f}{t_ref:>9.1f}{ref_best['loss']:>12.5f}")  # fmt: skip
    print(f"{'lorashelf (population-batched)':<34}{ours.evaluations:>6}{ours.passes:>7}"
          f"{per_ours:>9.3f}{t_ours:>9.1f}{ours.loss:>12.5f}")  # fmt: skip
    tokens = {"padded": len(shots) * int(encode_shots(tok, shots, max_length=None).input_ids.shape[1]),
              layout.name: layout.tokens}  # fmt: skip
    for name, sec in floors.items():
        print(f"{'floor: base model alone, ' + name:<34}{tokens[name]:>6}{'tok':>7}{sec:>9.3f}"
              f"{'':>9}{'':>12}   reference / floor = {per_ref / sec:.2f}x")  # fmt: skip
    print(
        f"lorashelf feeds the {layout.name} layout: {layout.tokens} tokens per candidate "
        f"(common prefix {layout.prefix}) against the reference's {tokens['padded']}"
    )
    print(
        f"trajectories identical for {prefix}/{budget} candidates; "
        f"max |loss diff| there {max(diffs, default=0.0):.2e}"
    )
    print(
        f"replaying lorashelf's {len(replay)} candidates through the reference: max |loss diff| "
        f"{replay_diff:.2e}; its best candidate scores {ours.trace[ours_best]['loss']:.5f} "
        f"here, {replay[ours_best]:.5f} there"
    )
    print(f"RESULT lorahub_speed: {per_ref / per_ours:.2f}x faster per candidate than the reference "
          f"loop; final loss {ours.loss:.5f} vs {ref_best['loss']:.5f} "
          f"(rel. diff {abs(ours.loss - ref_best['loss']) / ref_best['loss']:.1e})")  # fmt: skip
    write_json(args.json, {
        "experts": len(experts), "shots": args.shots, "budget": budget, "seed": args.seed,
        "dtype": args.dtype, "lora_dtype": args.lora_dtype, "task": args.task,
        "model": args.model, "device": str(device),
        "layout": layout.name, "tokens_per_candidate": tokens, "repeats": args.repeats,
        "floor_seconds_per_candidate": floors,
        "seconds_per_candidate": {"reference": per_ref, "lorashelf": per_ours},
        "speedup": per_ref / per_ours, "passes": {"reference": len(ref_trace), "lorashelf": ours.passes},
        "final_loss": {"reference": ref_best["loss"], "lorashelf": ours.loss},
        "identical_prefix": prefix, "max_loss_diff_on_prefix": max(diffs, default=0.0),
        "replay_max_loss_diff": replay_diff,
        "best_candidate_loss": {"lorashelf": ours.trace[ours_best]["loss"], "reference": replay[ours_best]},
        "load_average": [load0, load1],
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
