"""One evaluation session: load tasks and the base model once, then evaluate each
requested method on them and report (terminal table, JSON, routing report).

This is what ``lorashelf eval`` runs; the demo calls the same functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorashelf.config import write_json_atomic
from lorashelf.data import load_task
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.evaluate.runner import EvalConfig, EvalResult, evaluate
from lorashelf.evaluate.table import print_results
from lorashelf.library import Library
from lorashelf.methods import MethodContext, check_settings, prepare, split_spec
from lorashelf.models import DEFAULT_MODEL, BaseModel, load_base
from lorashelf.runtime import resolve_dtype


@dataclass(frozen=True)
class EvalRequest:
    tasks: tuple[str, ...]
    methods: tuple[str, ...] = ("base",)
    model: str | None = None
    library: Path | None = None
    dtype: str = "auto"
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    max_length: int = 1024
    max_examples: int | None = None
    chat: bool = False
    experts: tuple[str, ...] | None = None
    # the methods' options (``top_k``, ``density``, ...): each takes the keys it has
    settings: Mapping[str, Any] = field(default_factory=dict)
    oracle: Mapping[str, str] = field(default_factory=dict)
    json_out: Path | str | None = None  # "-": stdout
    routing_report: Path | None = None


def evaluate_methods(
    base: BaseModel,
    library: Library | None,
    tasks: list,
    methods: tuple[str, ...],
    cfg: EvalConfig,
    ctx: MethodContext,
    settings: Mapping[str, Any],
) -> tuple[list[EvalResult], dict[str, dict]]:
    """Evaluate every method on ``tasks``; returns results and routing stats per method."""
    results, routing = [], {}
    for method in methods:
        prepared = prepare(method, base.model, ctx, settings)
        try:
            res = evaluate(
                base.model, base.tokenizer, tasks, cfg, method=method, on_task=prepared.on_task
            )
        finally:
            prepared.close()
        res.meta.update({"model": base.name, "base_id": base.base_id, **prepared.info})
        if library is not None:
            res.meta["library"] = str(library.path)
        results.append(res)
        if prepared.routing:
            routing[method] = prepared.routing
    return results, routing


def check_methods(
    methods: tuple[str, ...],
    library: Library | None,
    experts: tuple[str, ...] | None,
    settings: Mapping[str, Any],
) -> None:
    specs = [split_spec(m)[0] for m in methods]
    check_settings(specs, settings)
    for m, spec in zip(methods, specs):
        if spec.kind != "base" and library is None:
            raise LorashelfError(f"method {m!r} needs a library; pass --library DIR")
    if library is not None:
        known = set(library.names())
        wanted = list(experts or ()) + [
            m.split(":", 1)[1] for m in methods if m.startswith("expert:")
        ]
        for n in wanted:
            if n not in known:
                raise LorashelfError(f"no expert {n!r} in {library.path}{did_you_mean(n, known)}")


def run_eval(req: EvalRequest, *, home: Path, device: torch.device) -> list[EvalResult]:
    library = Library.open(req.library) if req.library is not None else None
    check_methods(req.methods, library, req.experts, req.settings)  # before slow loading
    tasks = [load_task(t, home=home, max_examples=req.max_examples) for t in req.tasks]
    model_name = req.model or (library.base_model if library is not None else DEFAULT_MODEL)
    dtype = resolve_dtype(req.dtype, device)
    base = load_base(model_name, home=home, dtype=dtype, device=device)
    cfg = EvalConfig(
        split=req.split, limit=req.limit, seed=req.seed, batch_size=req.batch_size,
        max_length=req.max_length, chat=req.chat,
    )  # fmt: skip
    ctx = MethodContext(
        library, req.experts, dict(req.oracle), tokenizer=base.tokenizer, home=home,
        evaluation=cfg,
    )  # fmt: skip
    if req.routing_report and not any(split_spec(m)[0].kind == "router" for m in req.methods):
        raise LorashelfError(
            "--routing-report needs a routing method (--method arrow or phatgoose)"
        )
    results, routing = evaluate_methods(base, library, tasks, req.methods, cfg, ctx, req.settings)
    where = f" + {library.path.name}" if library is not None else ""
    print_results(results, title=f"{base.name}{where}, split {req.split}")
    if req.json_out:
        payload = (
            results[0].to_json()
            if len(results) == 1
            else {"methods": [r.to_json() for r in results]}
        )
        if str(req.json_out) == "-":
            print(json.dumps(payload, indent=2, allow_nan=False))
        else:
            write_json_atomic(req.json_out, payload)
            print(f"wrote {req.json_out}")
    if req.routing_report:
        from lorashelf.route import save_routing_report

        for method, stats in routing.items():
            out = req.routing_report
            if len(routing) > 1:
                out = out.with_name(f"{out.stem}-{method}{out.suffix}")
            paths = save_routing_report(stats, out, title=f"{method} routing")
            print(f"wrote {paths[0]} and {paths[1]}")
    return results
