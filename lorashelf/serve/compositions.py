"""What a request asks the served model to be: a :class:`Composition` of a library.

A composition is the base model, one expert (a trained, imported or LoraHub-composed
one: they are all experts of the library), an explicit weighting of experts (LoRAX's
per-request linear merge: the experts' outputs weighted), any weight-space merge of
lorashelf.merge.registry (``uniform``, ``ties``, ``dare-ties``, ``wudi``, ...), or
per-token routing by a router of lorashelf.route.registry (``arrow``, ``phatgoose``,
``retrieval``: experts picked per request from its prompt), optionally over a subset of experts, with the method's own options (``settings``:
fields of its options dataclass, as ``eval --set`` takes them).

Model ids name them (``LIB``, ``LIB/EXPERT``, ``LIB:METHOD`` for every merge and
router); ``lorashelf generate --method`` and the request body's ``lorashelf`` object
(what the ``openai`` client sends as ``extra_body``) use eval's method names plus
``weights:NAME=0.7,NAME=0.3``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorashelf.errors import LorashelfError, did_you_mean

OWN_KINDS = ("base", "expert", "weights")
OPTIONS = ("method", "top_k", "temperature", "experts", "weights", "merge", "density", "settings")


def merge_kinds() -> list[str]:
    from lorashelf.merge.registry import MERGES

    return MERGES.names()


def routed_kinds() -> list[str]:
    from lorashelf.route.registry import ROUTERS

    return ROUTERS.names()


def kinds() -> list[str]:
    return [*OWN_KINDS, *merge_kinds(), *routed_kinds()]


class UnknownModel(LorashelfError):
    """A model id (or its expert) that is not served: the server's 404."""

    def __init__(self, model: str, served: Sequence[str], why: str | None = None) -> None:
        super().__init__(
            f"the model {model!r} is not served: {why}"
            if why
            else f"the model {model!r} is not served{did_you_mean(model, served)}; "
            "GET /v1/models (or `lorashelf library ls LIB`) lists them"
        )
        self.model = model


@dataclass(frozen=True)
class Composition:
    """One servable composition of library ``library`` (hashable: a cache key)."""

    library: str
    kind: str = "base"
    experts: tuple[str, ...] | None = None  # subset, the one expert, or the weighted ones
    weights: tuple[float, ...] | None = None  # kind "weights": one per expert
    top_k: int | None = None  # routed: experts per token (None: the router's default)
    temperature: float = 1.0  # arrow: routing softmax temperature
    # the merge's or router's own options (sorted (field, value) pairs; checked by the
    # bank against the method's options dataclass)
    settings: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in kinds():
            raise LorashelfError(
                f"unknown method {self.kind!r}{did_you_mean(self.kind, kinds())}; use one of "
                f"{', '.join(kinds())}"
            )
        if self.kind == "expert" and (not self.experts or len(self.experts) != 1):
            raise LorashelfError("method expert needs exactly one expert: expert:NAME")
        if self.kind == "weights":
            if not self.experts or self.weights is None or len(self.weights) != len(self.experts):
                raise LorashelfError("weights need one weight per expert: weights:A=0.7,B=0.3")
        if self.top_k is not None and self.top_k < 1:
            raise LorashelfError(f"top_k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise LorashelfError(f"router temperature must be > 0, got {self.temperature}")

    @property
    def routed(self) -> bool:
        return self.kind in routed_kinds()

    @property
    def merged(self) -> bool:
        return self.kind in merge_kinds()

    def model_id(self) -> str:
        """The model id that names this composition (without per-request options)."""
        if self.kind == "base":
            return self.library
        if self.kind == "expert":
            return f"{self.library}/{self.experts[0]}"
        return f"{self.library}:{self.kind}"


def parse_model_id(model: str, libraries: Sequence[str], served: Sequence[str]) -> Composition:
    """``LIB``, ``LIB/EXPERT`` or ``LIB:METHOD`` -> a composition (expert names unchecked;
    ``served`` are the model ids that a "did you mean" suggests)."""
    if model in libraries:
        return Composition(model)
    lib, slash, expert = model.partition("/")
    if slash and lib in libraries and expert:
        return Composition(lib, "expert", (expert,))
    lib, colon, method = model.rpartition(":")
    if colon and lib in libraries:
        try:
            return parse_method(lib, method)
        except LorashelfError:
            pass
    raise UnknownModel(model, served)


def parse_method(library: str, method: str) -> Composition:
    """eval's method names (``base``, ``expert:NAME``, every merge and served router)
    plus ``weights:NAME=W,NAME=W``."""
    kind, _, arg = method.strip().partition(":")
    if kind == "expert":
        if not arg:
            raise LorashelfError("use expert:NAME to pick an expert")
        return Composition(library, "expert", (arg,))
    if kind == "weights":
        pairs = [p.partition("=") for p in arg.split(",") if p]
        try:
            weights = tuple(float(w) for _, _, w in pairs)
        except ValueError:
            raise LorashelfError(f"bad weights {arg!r}: use weights:NAME=0.7,NAME=0.3") from None
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise LorashelfError(f"bad weights {arg!r}: use weights:NAME=0.7,NAME=0.3")
        return Composition(library, "weights", tuple(n for n, _, _ in pairs), weights)
    if arg or kind not in kinds():
        known = ["expert:NAME", "weights:NAME=W,...", *merge_kinds(), *routed_kinds()]
        raise LorashelfError(
            f"unknown method {method!r}{did_you_mean(kind, kinds())}; use base, {', '.join(known)}"
        )
    return Composition(library, kind)


def with_options(comp: Composition, options: Mapping[str, Any] | None) -> Composition:
    """Apply a request's ``lorashelf`` options (method, top_k, temperature, experts,
    weights, merge, density, settings) to the composition its model id names."""
    if not options:
        return comp
    unknown = sorted(set(options) - set(OPTIONS) - {"return_routing"})
    if unknown:
        raise LorashelfError(
            f"unknown lorashelf option {unknown[0]!r}; known: {', '.join(OPTIONS)}"
        )
    if options.get("method") is not None:
        comp = parse_method(comp.library, _typed(options, "method", str))
    fields: dict[str, Any] = {}
    if options.get("merge") is not None:
        merge = _typed(options, "merge", str)
        if merge not in merge_kinds():
            raise LorashelfError(
                f"merge must be one of {', '.join(merge_kinds())}, got {merge!r}"
                f"{did_you_mean(merge, merge_kinds())}"
            )
        fields["kind"] = merge
    if options.get("experts") is not None:
        experts = options["experts"]
        if (
            not isinstance(experts, list)
            or not experts
            or not all(isinstance(e, str) for e in experts)
        ):
            raise LorashelfError("lorashelf.experts must be a non-empty list of expert names")
        fields["experts"] = tuple(experts)
    if options.get("weights") is not None:
        fields["kind"] = "weights"
        fields.update(_weights(options["weights"], fields.get("experts")))
    for key, typ in (("top_k", int), ("temperature", float)):
        if options.get(key) is not None:
            fields[key] = _typed(options, key, typ)
    settings = dict(comp.settings)
    if options.get("settings") is not None:
        raw = options["settings"]
        if not isinstance(raw, dict) or not all(
            isinstance(v, (str, int, float, bool)) for v in raw.values()
        ):
            raise LorashelfError(
                "lorashelf.settings must map option names to numbers, strings or booleans: "
                '{"density": 0.3}'
            )
        settings.update(raw)
    if options.get("density") is not None:  # the common one, as LoRAX names it
        settings["density"] = _typed(options, "density", float)
    if settings:
        fields["settings"] = tuple(sorted(settings.items()))
    _check_ranges({**fields, **dict(fields.get("settings", ()))})
    if fields.get("kind", comp.kind) == "expert" and "experts" in fields:
        raise LorashelfError(
            "lorashelf.experts applies to merges, weights and routing, not one expert"
        )
    return dataclasses.replace(comp, **fields)


def _weights(raw: Any, experts: tuple[str, ...] | None) -> dict[str, Any]:
    if isinstance(raw, dict):
        if not raw or not all(isinstance(v, (int, float)) for v in raw.values()):
            raise LorashelfError('lorashelf.weights must map expert names to numbers: {"a": 0.7}')
        return {"experts": tuple(raw), "weights": tuple(float(v) for v in raw.values())}
    if isinstance(raw, list) and experts and len(raw) == len(experts):
        if all(isinstance(v, (int, float)) for v in raw):
            return {"weights": tuple(float(v) for v in raw)}
    raise LorashelfError(
        "lorashelf.weights must be {name: weight} or a list of numbers, one per lorashelf.experts"
    )


def _check_ranges(fields: Mapping[str, Any]) -> None:
    """A request's 400 for an option its method would refuse (``top_k: 0`` was taken
    as the default; the others failed later, inside the batch)."""
    top_k, temp, density = (fields.get(k) for k in ("top_k", "temperature", "density"))
    if top_k is not None and top_k < 1:
        raise LorashelfError(f"lorashelf.top_k must be at least 1, got {top_k}")
    if temp is not None and not (math.isfinite(temp) and temp > 0):
        raise LorashelfError(f"lorashelf.temperature must be a number > 0, got {temp}")
    if density is not None and not 0 < density <= 1:
        raise LorashelfError(f"lorashelf.density must be in (0, 1], got {density}")


def _typed(options: Mapping[str, Any], key: str, typ: type) -> Any:
    value = options[key]
    ok = isinstance(value, typ) or (typ is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
        raise LorashelfError(f"lorashelf.{key} must be a {typ.__name__}, got {value!r}")
    return typ(value)
