"""Turn a method spec into the one adapter it reduces to: ``{module path: LoraFactors}``.

A static composition is one LoRA: a single expert (a trained, imported or composed one:
a LoraHub result saved to the library is just an expert), the uniform or TIES merge of
Ostapenko et al. 2024 (arXiv 2405.11157), or an explicit weighting of experts. Routed
methods (Arrow, PHATGOOSE) choose experts per token, so no single adapter represents
them; they are refused with a pointer to ``lorashelf serve``. Specs are spelled as in
``lorashelf eval``:

- ``expert:NAME``: that expert, exactly.
- ``uniform`` / ``uniform-delta`` / ``ties``: :func:`lorashelf.merge.merge` over the
  library (or ``experts``); a dense TIES result needs ``rank`` for its SVD truncation.
- ``weights:A=0.7,B=0.3``: :func:`lorashelf.lora.combine` of those experts; ``mix="output"``
  is the weighted sum of their updates, exact by concatenation (rank = sum of ranks),
  ``mix="params"`` LoraHub's weighted sum of the A and B matrices.

Every expert must belong to the library's base model; a result above ``rank`` is cut by
:func:`lorashelf.lora.truncate_all` and the relative Frobenius error is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import Library
from lorashelf.lora import LoraFactors, combine, truncate_all

MERGE_METHODS = ("uniform", "uniform-delta", "ties")
ROUTED_METHODS = ("arrow", "phatgoose", "oracle")
METHOD_FORMS = ("expert:NAME", *MERGE_METHODS, "weights:NAME=W,NAME=W")


@dataclass(frozen=True)
class Resolved:
    """One adapter's factors and the record of how they were made (written beside it)."""

    factors: dict[str, LoraFactors] = field(repr=False)
    method: str
    experts: list[str]
    truncation_error: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "experts": self.experts,
            "config": self.config,
            "relative_truncation_error": self.truncation_error,
        }


def resolve(
    lib: Library,
    method: str,
    *,
    experts: Sequence[str] | None = None,
    rank: int | None = None,
    density: float = 0.2,
    mix: str = "output",
) -> Resolved:
    """The single adapter that ``method`` over ``lib`` reduces to (see the module doc)."""
    kind, _, arg = method.partition(":")
    if kind in ROUTED_METHODS:
        raise LorashelfError(
            f"method {kind!r} routes each token to its own mix of experts, so it cannot be "
            f"exported as one adapter; serve it with `lorashelf serve {lib.path}`, or export a static "
            f"method ({', '.join(METHOD_FORMS)})"
        )
    if experts and kind not in MERGE_METHODS:
        raise LorashelfError(f"--experts picks the experts of a merge; drop it for {kind}")
    if kind == "expert":
        if not arg:
            raise LorashelfError("use --method expert:NAME to export one expert")
        names, config, factors = [arg], {}, _factors(lib, [arg])[0]
    elif kind == "weights":
        weights = parse_weights(arg)
        names, config = list(weights), {"weights": weights, "mix": mix}
        factors = _combine(_factors(lib, names), list(weights.values()), mix)
    elif kind in MERGE_METHODS and not arg:
        from lorashelf.merge import merge

        names = list(experts) if experts else lib.names()
        config = {"density": density} if kind == "ties" else {}
        merged = merge(_factors(lib, names), kind, config or None)
        if not merged.is_low_rank and rank is None:
            raise LorashelfError(
                f"{kind} gives a dense update per module; pass --rank K to export it as a "
                "rank-K LoRA by SVD truncation (e.g. --rank 16)"
            )
        factors = merged.modules  # type: ignore[assignment]
    else:
        hint = did_you_mean(kind, ("expert", "weights", *MERGE_METHODS))
        raise LorashelfError(
            f"unknown method {method!r}{hint}; export one of: {', '.join(METHOD_FORMS)}"
        )
    cut, error = truncate_all(factors, rank)
    config = {**config, "rank": rank} if rank is not None else config
    return Resolved(cut, method, names, error, config)


def parse_weights(arg: str) -> dict[str, float]:
    """``"A=0.7,B=0.3"`` -> ``{"A": 0.7, "B": 0.3}`` (names in the order given)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        name, sep, raw = part.partition("=")
        try:
            out[name.strip()] = float(raw)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise LorashelfError(
                f"bad weight {part!r}; write --method weights:NAME=0.7,OTHER=0.3"
            ) from None
    if not out:
        raise LorashelfError("no weights given; write --method weights:NAME=0.7,OTHER=0.3")
    return out


def _factors(lib: Library, names: Sequence[str]) -> list[dict[str, LoraFactors]]:
    """Each named expert's factors (float32), refusing experts of another base model."""
    from lorashelf.models import same_base

    known = set(lib.names())
    out = []
    for name in names:
        if name not in known:
            raise LorashelfError(f"no expert {name!r} in {lib.path}{did_you_mean(name, known)}")
        expert = lib.get(name)
        base = expert.card.get("base_model") or lib.base_model
        if not same_base(base, lib.base_model):
            raise LorashelfError(
                f"expert {name!r} was trained on {base}, not on the library's base "
                f"{lib.base_model}; export it from a library of {base}, or retrain it"
            )
        out.append(expert.lora_factors(device="cpu", dtype=_float32()))
    if not out:
        raise LorashelfError(f"library {lib.path} has no experts to export; add some first")
    return out


def _combine(
    experts: list[dict[str, LoraFactors]], weights: list[float], mix: str
) -> dict[str, LoraFactors]:
    """:func:`combine` module by module; a module some experts lack counts them as zero."""
    modules = sorted({m for e in experts for m in e})
    out = {}
    for m in modules:
        present = [(e[m], w) for e, w in zip(experts, weights) if m in e]
        if mix == "params" and len(present) < len(experts):
            raise LorashelfError(
                f"mix='params' needs every expert to adapt {m}; use --mix output, which "
                "sums the updates and treats a missing module as zero"
            )
        out[m] = combine([f for f, _ in present], [w for _, w in present], mix)
    return out


def _float32() -> Any:
    import torch

    return torch.float32
