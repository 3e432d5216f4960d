"""LoraHub: compose a library's experts for a new task from a few examples, no gradients.

LoraHub (Huang et al. 2023, arXiv 2307.13269; reference code sail-sg/lorahub) gives
each expert one weight ``w_e`` in ``[-1.5, 1.5]``, composes them (``A = sum w_e A_e``,
``B = sum w_e B_e``) and searches ``w`` with a gradient-free optimiser to minimise the
shots' cross-entropy plus ``0.05 * mean|w|``, 40 evaluations from ``w = 0``.
:func:`compose` keeps those semantics (``mix="params"``, ``loss="reference"``,
``optimizer="ngopt"`` reproduces the reference's objective and search) for causal LMs
and makes each evaluation cheap: the experts are attached once as a mixture, a
generation of candidates is scored in one batched pass with the LM head only at
target positions (lorashelf.compose.scoring), nothing is reloaded between candidates.
The result carries the weights, the composed expert's factors, the search trace and
the final loss; lorashelf.compose.save writes it into the library as a new expert.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorashelf.compose.composed import check_same_ranks, composed_factors
from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.gradient import adam_search
from lorashelf.compose.optimisers import OPTIMISERS, Optimiser
from lorashelf.compose.preselect import PRESELECTORS, preselect
from lorashelf.compose.scoring import PopulationScorer
from lorashelf.compose.shots import ShotBatch, encode_shots, fingerprint, model_context
from lorashelf.config import to_dict
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import Library, LoraFactors
from lorashelf.lora.stack import Experts


@dataclass
class CompositionResult:
    """What a composition found: weights per expert, the composed factors, the trace."""

    experts: list[str]
    weights: list[float]
    factors: dict[str, LoraFactors] = field(repr=False)
    loss: float  # objective at ``weights``: ce + l1 * mean|w|
    ce: float
    trace: list[dict[str, Any]] = field(repr=False)
    seconds: float
    passes: int  # batched forward passes run
    config: ComposeConfig
    examples_fingerprint: str
    n_examples: int
    expert_rank: int = 0  # the largest rank among the composed experts
    preselection: dict[str, float] | None = None  # every candidate expert's score

    @property
    def weight_map(self) -> dict[str, float]:
        return dict(zip(self.experts, self.weights))

    @property
    def evaluations(self) -> int:
        return len(self.trace)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything but the factors."""
        return {
            "method": "lorahub",
            "weights": self.weight_map,
            "loss": self.loss,
            "ce": self.ce,
            "evaluations": self.evaluations,
            "passes": self.passes,
            "seconds": round(self.seconds, 3),
            "examples_fingerprint": self.examples_fingerprint,
            "n_examples": self.n_examples,
            "preselection": self.preselection,
            "config": to_dict(self.config),
            "trace": self.trace,
        }


def resolve_experts(
    source: Library | Experts | Sequence[Any],
    names: Sequence[str] | None,
    device: torch.device,
) -> list[tuple[str, dict[str, LoraFactors]]]:
    """``[(name, {module: factors})]`` (fp32, on ``device``) from a library, a list of
    library :class:`~lorashelf.library.Expert` or of ``(name, factors)`` pairs."""
    if isinstance(source, Library):
        known = source.names()
        for n in names or ():
            if n not in known:
                raise LorashelfError(f"no expert {n!r} in {source.path}{did_you_mean(n, known)}")
        items: list[Any] = [source.get(n) for n in (names or known)]
    else:
        items = list(source)
    pairs = []
    for item in items:
        if hasattr(item, "lora_factors"):
            pairs.append((item.name, item.lora_factors(device=device, dtype=torch.float32)))
        else:
            name, fs = item
            pairs.append((name, {m: _to(f, device) for m, f in fs.items()}))
    if names and not isinstance(source, Library):
        by_name = dict(pairs)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LorashelfError(f"no expert {missing[0]!r}{did_you_mean(missing[0], by_name)}")
        pairs = [(n, by_name[n]) for n in names]
    if not pairs:
        raise LorashelfError("no experts to compose; add adapters to the library first")
    return pairs


def _to(f: Any, device: torch.device) -> LoraFactors:
    return LoraFactors(
        A=f.A.to(device, torch.float32), B=f.B.to(device, torch.float32), scale=f.scale
    )


def compose(
    base_model: nn.Module,
    tokenizer: Any,
    library_or_experts: Library | Experts | Sequence[Any],
    examples: Sequence[Example],
    config: ComposeConfig | None = None,
    *,
    progress: bool = False,
) -> CompositionResult:
    """Search one weight per expert on ``examples``; ``base_model`` is restored after."""
    config = config or ComposeConfig()
    start = time.perf_counter()
    spec = OPTIMISERS.get(config.optimizer)  # unknown names fail before any work
    if config.preselect is not None:
        PRESELECTORS.get(config.preselect_by)
    device = next(base_model.parameters()).device
    experts = resolve_experts(library_or_experts, config.experts, device)
    if config.mix == "params":
        check_same_ranks(experts)
    max_length = config.max_length or model_context(base_model)
    shots = encode_shots(
        tokenizer, examples, max_length=max_length, eos=config.eos, chat=config.chat
    )
    was_training = base_model.training
    base_model.eval()
    try:
        experts, scores = _preselected(base_model, experts, shots, config)
        with PopulationScorer.from_config(base_model, experts, shots, config) as scorer:
            if spec.gradient:
                weights, trace = adam_search(base_model, scorer, config, progress)
            else:
                weights, trace = search(scorer, spec, config, progress)
            final = _final(scorer, trace, weights, config)
            passes = scorer.passes
    finally:
        base_model.train(was_training)
    return CompositionResult(
        experts=[n for n, _ in experts],
        weights=[float(x) for x in weights],
        factors=composed_factors(experts, weights, config.mix),
        loss=final["loss"],
        ce=final["ce"],
        trace=trace,
        seconds=time.perf_counter() - start,
        passes=passes,
        config=config,
        examples_fingerprint=fingerprint(examples),
        n_examples=len(examples),
        expert_rank=max(f.rank for _, fs in experts for f in fs.values()),
        preselection=scores,
    )


def _preselected(
    model: nn.Module, experts: list, shots: ShotBatch, config: ComposeConfig
) -> tuple[list, dict[str, float] | None]:
    """The experts kept by ``config.preselect`` (all if it is None or >= their number)."""
    if config.preselect is None or config.preselect >= len(experts):
        return experts, None
    keep, scores = preselect(model, experts, shots, config)
    return [experts[i] for i in keep], scores


def search(
    scorer: PopulationScorer, spec: Optimiser, config: ComposeConfig, progress: bool = False
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Run the ask/tell loop for ``config.budget`` evaluations; returns the weights
    (the optimiser's recommendation, else the best candidate) and one trace entry per
    evaluated candidate."""
    assert spec.make is not None
    opt = spec.make(scorer.n_experts, config)
    lo, hi = config.bounds
    trace: list[dict[str, Any]] = []
    generation = 0
    with tqdm(total=config.budget, desc="lorahub", disable=not progress) as bar:
        while len(trace) < config.budget:
            xs = opt.ask()[: config.budget - len(trace)]
            losses = _score(scorer, [np.clip(x, lo, hi) for x in xs], config)
            opt.tell(xs, [t["loss"] for t in losses])
            for t in losses:
                trace.append({"eval": len(trace), "generation": generation, **t})
            generation += 1
            bar.update(len(xs))
            bar.set_postfix(loss=f"{min(t['loss'] for t in trace):.4f}")
    recommended = opt.recommend()
    if recommended is None:
        best = min(trace, key=lambda t: t["loss"])
        return np.asarray(best["weights"], dtype=np.float64), trace
    return np.clip(recommended, lo, hi), trace


def _score(
    scorer: PopulationScorer, xs: list[np.ndarray], config: ComposeConfig
) -> list[dict[str, Any]]:
    """Objective ``ce + l1 * mean|w|`` of each candidate (the penalty in float64)."""
    ces = scorer.losses(torch.tensor(np.stack(xs), dtype=torch.float32)).tolist()
    return [
        {"loss": ce + config.l1 * float(np.abs(x).mean()), "ce": ce, "weights": x.tolist()}
        for ce, x in zip(ces, xs)
    ]


def _final(
    scorer: PopulationScorer,
    trace: list[dict[str, Any]],
    weights: np.ndarray,
    config: ComposeConfig,
) -> dict[str, Any]:
    """The trace entry of ``weights``, or a fresh evaluation if it was never scored."""
    for t in trace:
        if np.array_equal(np.asarray(t["weights"]), weights):
            return t
    return _score(scorer, [weights], config)[0]
