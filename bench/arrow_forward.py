"""Tokens/s of Arrow routing on SmolLM2-135M over libraries of 8 to 1024 experts:
lorashelf against the base model, one merged expert and PEFT's Arrow, in one run.

Experts are synthetic rank-4 LoRAs on q_proj and v_proj of every layer (alpha 8),
identical for both implementations (PEFT reads them from PEFT directories written
here, with ``autocast_adapter_dtype=False`` so it also computes in bf16). Each row
times the backbone forward (``model.model``: hidden states, no LM head, as
lorashelf's scorer runs it) of a batch of 8 x 128 tokens: the median of ``--reps``
runs, each next to a run of the plain base model, and the row's ratio is the median
of the ratios to those neighbours (a shared machine's load hits both alike);
cpu/base is the same ratio in process CPU time, the steadier measure under load
with ``--threads 1``.
Setup is the time to prepare the experts (PEFT: loading the adapters; lorashelf:
exact prototypes and stacking); "tensors" is the memory each adds, "peak" the growth
of malloc'd memory during one forward (activations). ``--strategies`` times one
mixture layer with its dense, gather and sparse paths for 32 to 1024 experts (the data
behind the ``auto`` crossover in lorashelf.lora.mixture); ``--paths dense,gather``
gives each library size one row per path of the whole model instead of ``auto``'s.
PEFT runs only up to ``--peft-max`` experts: it loads the adapters one by one (107 s
for 128 on a 2-core CPU) and computes every expert for every token.
``--device`` and ``--model random:CONFIG`` (bench/_common.py) run it on a GPU and on
other shapes; on CUDA every timed call is followed by a synchronize.

    .venv/bin/python bench/arrow_forward.py [--quick] [--threads N] [--strategies]
        [--sizes 8 32 128 256 1024] [--paths auto] [--peft-max 128] [--device D]
        [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from _common import add_model_args, load_model, resolve_device, sync, write_json
from safetensors.torch import save_file

from lorashelf.route import ArrowConfig, build_routed_model

TARGETS = ("q_proj", "v_proj")
RANK, ALPHA = 4, 8


class PeakHeap:
    """Peak growth (bytes) of the memory malloc has handed out while the block runs,
    sampled every 1 ms (glibc's mallinfo2; falls back to the resident set size)."""

    def __enter__(self) -> PeakHeap:
        self.start = self.peak = _in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _in_use())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(0, self.peak - self.start)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _in_use() -> int:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    except (OSError, AttributeError):
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
        except OSError:
            return 0


def make_experts(model: torch.nn.Module, n: int, seed: int) -> list[tuple[str, dict]]:
    from lorashelf.library.factors import LoraFactors

    g = torch.Generator().manual_seed(seed)
    mods = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS
    ]
    out = []
    for i in range(n):
        factors = {}
        for name, m in mods:
            A = torch.randn(RANK, m.in_features, generator=g) / m.in_features**0.5
            B = torch.randn(m.out_features, RANK, generator=g) * 0.02
            factors[name] = LoraFactors(A, B, ALPHA / RANK)
        out.append((f"expert{i:03d}", factors))
    return out


def write_peft_dirs(experts: list[tuple[str, dict]], root: Path, base_id: str) -> list[str]:
    from peft import LoraConfig

    paths = []
    for name, factors in experts:
        d = root / name
        cfg = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), base_model_name_or_path=base_id
        )
        cfg.save_pretrained(str(d))
        tensors = {}
        for m, f in factors.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = f.A.contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = f.B.contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        paths.append(str(d))
    return paths


def interleaved(fn, ref, reps: int, device: torch.device | None = None) -> dict:
    """Median wall and process-CPU seconds of ``fn`` and of ``ref``, timed alternately
    (so load on a shared machine hits both alike), and the peak memory growth of one
    ``fn`` call. CPU time counts only this process's work: with one thread it is the
    steadier measure when other jobs share the cores."""
    device = device or torch.device("cpu")
    with torch.no_grad():
        fn(), ref()  # warm-up (PEFT builds its prototypes here)
        with PeakHeap() as mem:
            fn()
        if device.type == "cuda":  # on a GPU: the growth of allocated device memory
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            fn()
            mem.growth = torch.cuda.max_memory_allocated(device) - start
        t = {"fn": [], "ref": [], "fn_cpu": [], "ref_cpu": []}
        for _ in range(reps):
            for f, key in ((ref, "ref"), (fn, "fn")):
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                sync(device)
                t[key].append(time.perf_counter() - t0)
                t[key + "_cpu"].append(time.process_time() - c0)

    def ratio(a: list[float], b: list[float]) -> float:  # median over adjacent pairs
        return statistics.median(x / max(y, 1e-9) for x, y in zip(a, b))

    return {
        "secs": statistics.median(t["fn"]),
        "base_secs": statistics.median(t["ref"]),
        "time_vs_base": ratio(t["fn"], t["ref"]),
        "cpu_vs_base": ratio(t["fn_cpu"], t["ref_cpu"]),
        "peak": mem.growth,
    }


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_merged(ref, expert, base_fwd, reps) -> dict:
    merged = copy.deepcopy(ref)
    with torch.no_grad():
        for m, f in expert.items():
            lin = merged.get_submodule(m)
            lin.weight += (f.scale * f.B.float() @ f.A.float()).to(lin.weight.dtype)
    timing = interleaved(lambda: merged.model(**BATCH), base_fwd, reps, DEVICE[0])
    return {**timing, "setup": 0.0, "static": 0}


def run_ours(model, experts, k, base_fwd, reps, strategy: str = "auto") -> dict:
    device = DEVICE[0]
    sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = build_routed_model(
            model, experts, "arrow", ArrowConfig(top_k=k), strategy=strategy, device=device
        )
    sync(device)
    setup = time.perf_counter() - t0
    static = tensor_bytes(b for layer in routed.handle.layers.values() for b in layer.buffers())
    timing = interleaved(lambda: model.model(**BATCH), base_fwd, reps, device)
    routed.detach()
    return {**timing, "setup": setup, "static": static}


def load_peft(ref, paths):
    from peft import ArrowConfig as PeftArrowConfig
    from peft import create_arrow_model

    t0 = time.perf_counter()
    cfg = PeftArrowConfig(top_k=1, router_temperature=1.0, rng_seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = create_arrow_model(
            copy.deepcopy(ref), paths, arrow_config=cfg, autocast_adapter_dtype=False
        ).eval()
    return peft, time.perf_counter() - t0


def run_peft(peft, setup, k, base_fwd, reps) -> dict:
    arrows = [m.lora_arrow["arrow_router"] for m in peft.modules() if hasattr(m, "lora_arrow")]
    for a in arrows:
        a.top_k = k  # one load per library size; top_k is read at each forward
    backbone = peft.get_base_model().model
    timing = interleaved(lambda: backbone(**BATCH), base_fwd, reps, DEVICE[0])
    lora = [p for n, p in peft.named_parameters() if "lora_" in n]
    protos = [b for n, b in peft.named_buffers() if n.endswith("prototypes")]
    return {**timing, "setup": setup, "static": tensor_bytes(lora + protos)}


BATCH: dict[str, torch.Tensor] = {}
DEVICE: list[torch.device] = []  # where the model runs (set once in main)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 32, 128, 256])
    ap.add_argument("--top-k", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="E=8,32 with top-k 4 only")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--peft-max", type=int, default=128, help="largest library PEFT runs on")
    ap.add_argument(
        "--paths",
        default="auto",
        help="lorashelf's mixture paths, comma-separated: auto,dense,gather,sparse",
    )
    add_model_args(ap)
    ap.add_argument("--strategies", action="store_true", help="also sweep dense vs gather")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.top_k = [8, 32], [4]

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    DEVICE.append(device)
    base = load_model(args.model, device, torch.bfloat16)
    model = base.model.eval()
    ref = copy.deepcopy(model)  # stays plain: the baseline every row is timed against
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.seq), generator=g)
    ids = ids.to(device)
    BATCH.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    n_tok = ids.numel()
    experts_all = make_experts(model, max(args.sizes), seed=0)
    base_fwd = lambda: ref.model(**BATCH)  # noqa: E731
    rows: list[dict] = []

    def add(label, E, k, res):
        rows.append({"method": label, "E": E, "k": k, **res})
        r = rows[-1]
        print(
            f"  {label:22s} E={E!s:>4} k={k!s:>2} {n_tok / r['secs']:8.0f} tok/s "
            f"{r['time_vs_base']:6.2f}x base  setup {r['setup']:6.2f} s",
            flush=True,
        )

    add("merged (1 expert)", 1, "-", run_merged(ref, experts_all[0][1], base_fwd, args.reps))
    with tempfile.TemporaryDirectory() as tmp:
        for E in args.sizes:
            peft, setup = None, 0.0
            if not args.no_peft and E <= args.peft_max:
                paths = write_peft_dirs(experts_all[:E], Path(tmp) / f"E{E}", base.base_id)
                peft, setup = load_peft(ref, paths)
            for k in args.top_k:
                for path in args.paths.split(","):
                    res = run_ours(model, experts_all[:E], k, base_fwd, args.reps, path)
                    add("lorashelf arrow" + ("" if path == "auto" else f" {path}"), E, k, res)
                if peft is not None:
                    add("peft arrow", E, k, run_peft(peft, setup, k, base_fwd, args.reps))
            del peft
    sweep = strategy_sweep(n_tok, device) if args.strategies else None
    report(rows, args, n_tok, sweep, model.config)


def strategy_sweep(n_tok: int, device: torch.device) -> list[dict]:
    """One q_proj-shaped mixture layer (576 -> 576, rank 4, bf16): dense, gather and sparse
    paths, at the run's token count and at decoding's 16 tokens."""
    from lorashelf.library.factors import LoraFactors
    from lorashelf.route import ArrowRouter, attach

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tok, 576, generator=g).to(device, torch.bfloat16)
    net = torch.nn.Sequential(torch.nn.Linear(576, 576, bias=False).to(device, torch.bfloat16))
    out = []
    print("\nmixture layer alone (q_proj shape, rank 4, bf16): ms per call")
    print(f"{'E':>5s} {'k':>2s} {'tokens':>6s} {'dense':>8s} {'gather':>8s} {'sparse':>8s}")
    for E in (32, 128, 256, 512, 1024):
        experts = []
        for i in range(E):
            A = torch.randn(4, 576, generator=g) / 24
            B = torch.randn(576, 4, generator=g) * 0.02
            experts.append((f"e{i}", {"0": LoraFactors(A, B, 2.0)}))
        for k in (2, 4):
            router = ArrowRouter(torch.randn(E, 576, generator=g), k, 1.0)
            for xs in (x, x[:16]):
                ms = {}
                for strategy in ("dense", "gather", "sparse"):
                    with attach(net, experts, routers={"0": router}, strategy=strategy):
                        with torch.inference_mode():
                            timing = interleaved(lambda xs=xs: net(xs), lambda: None, 5, device)
                        ms[strategy] = timing["secs"] * 1e3
                out.append({"E": E, "k": k, "tokens": len(xs), **ms})
                print(f"{E:5d} {k:2d} {len(xs):6d} {ms['dense']:8.2f} {ms['gather']:8.2f} "
                      f"{ms['sparse']:8.2f}", flush=True)  # fmt: skip
    return out


def report(rows: list[dict], args, n_tok: int, sweep: list[dict] | None, config) -> None:
    base_secs = statistics.median(r["base_secs"] for r in rows)
    for r in rows:
        r["tok_s"] = n_tok / r["secs"]
    peft = {(r["E"], r["k"]): r for r in rows if r["method"] == "peft arrow"}
    skipped = sorted({E for E in args.sizes if E > args.peft_max and not args.no_peft})
    for r in rows:
        p = peft.get((r["E"], r["k"])) if r["method"].startswith("lorashelf") else None
        r["peft_over_ours"] = p["time_vs_base"] / r["time_vs_base"] if p else None
        r["peft_over_ours_cpu"] = p["cpu_vs_base"] / r["cpu_vs_base"] if p else None
    where = DEVICE[0].type if DEVICE[0].type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"\n{args.model} bf16 on {where}, backbone forward of {args.batch} x {args.seq} tokens, "
        f"rank-{RANK} experts on {'+'.join(TARGETS)} x {config.num_hidden_layers} layers, "
        f"medians of {args.reps} runs, each beside a run of the base model"
    )
    if skipped:
        print(
            f"PEFT not run at E = {', '.join(map(str, skipped))} (--peft-max {args.peft_max}): "
            "it loads adapters one by one and computes every expert for every token"
        )
    print(
        f"{'method':22s} {'E':>4s} {'k':>2s} {'tok/s':>7s} {'time/base':>9s} {'PEFT/ours':>9s} "
        f"{'cpu/base':>8s} {'PEFT/ours':>9s} {'setup s':>7s} {'tensors MB':>10s} {'peak MB':>7s}"
    )
    print(f"{'base':22s} {'-':>4s} {'-':>2s} {n_tok / base_secs:7.0f} {1.0:8.2f}x")
    for r in rows:
        vs = f"{r['peft_over_ours']:8.2f}x" if r["peft_over_ours"] else " " * 9
        vs_cpu = f"{r['peft_over_ours_cpu']:8.2f}x" if r["peft_over_ours_cpu"] else " " * 9
        print(
            f"{r['method']:22s} {r['E']!s:>4s} {r['k']!s:>2s} {r['tok_s']:7.0f} "
            f"{r['time_vs_base']:8.2f}x {vs} {r['cpu_vs_base']:7.2f}x {vs_cpu} {r['setup']:7.2f} "
            f"{r['static'] / 2**20:10.1f} {r['peak'] / 2**20:7.0f}"
        )
    parts = [_target(rows, 32, 1.25, 2), _target(rows, 256, 1.5, 10)]
    if any(parts):
        print(f"RESULT arrow_forward: {'; '.join(p for p in parts if p)}")
    write_json(
        args.json,
        {
            "name": "arrow_forward",
            "tokens_per_batch": n_tok,
            "base_tok_s": n_tok / base_secs,
            "rows": rows,
            "strategy_sweep_ms": sweep,
            "model": args.model,
            "device": str(DEVICE[0]),
            "baseline": f"{args.model} backbone forward (same run, interleaved); "
            "PEFT create_arrow_model",
        },
    )


def _target(rows: list[dict], E: int, max_time: float, min_vs_peft: float) -> str:
    """The headline at ``E`` experts, k=4: the fastest lorashelf path against its targets."""
    ours = [r for r in rows if r["method"].startswith("lorashelf") and (r["E"], r["k"]) == (E, 4)]
    if not ours:
        return ""
    t = min(ours, key=lambda r: r["time_vs_base"])
    path = t["method"].removeprefix("lorashelf arrow").strip() or "auto"
    msg = f"E={E} k=4 ({path}): {t['time_vs_base']:.2f}x base time (target <= {max_time}x)"
    if t["peft_over_ours"]:
        msg += f", {t['peft_over_ours']:.2f}x faster than PEFT (target >= {min_vs_peft}x)"
    else:
        msg += ", PEFT not run"
    return msg


if __name__ == "__main__":
    main()
