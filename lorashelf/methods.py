"""Zero-shot reuse methods as one table: base, one expert, oracle, every merge, every router.

``eval``, ``fewshot``, ``serve``, ``generate``, ``export`` and the demo turn a method
name into a model here. The table is derived, not written twice: besides ``base``,
``expert:NAME`` and ``oracle`` it holds every entry of :data:`lorashelf.merge.MERGES`
(folded into the weights, undone exactly on close) and of
:data:`lorashelf.route.ROUTERS` (routed per token through the mixture layer), so a new
merge or router is a method everywhere the day its registry line is added. Each
method declares its options as a frozen dataclass (``config_cls``); callers pass one
flat ``settings`` mapping (CLI flags, ``--set key=value``) and every method takes the
keys its dataclass has, so a default lives once, in that dataclass. The methods of
Ostapenko et al. 2024 (arXiv 2405.11157) then differ only in how the model was built:
evaluation scores a prepared model exactly as it scores the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorashelf.best_expert import BestExpertConfig, build_best_expert
from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import Library
from lorashelf.lora import attach
from lorashelf.merge import MERGES
from lorashelf.registry import Registry
from lorashelf.route import ROUTERS


@dataclass(frozen=True)
class MethodContext:
    """What a method may use besides its options: the library, a subset of its experts,
    and the oracle's map from a held-out task to the training task standing for it."""

    library: Library | None
    experts: tuple[str, ...] | None = None
    oracle: Mapping[str, str] = field(default_factory=dict)
    tokenizer: Any = None  # the base model's, for methods that embed text (retrieval)
    home: Path | None = None  # the data root the experts' training tasks load from
    evaluation: Any = None  # the EvalConfig being run (split, seed, limit: best-expert)

    def names(self) -> list[str]:
        """The experts to use (the subset, else the whole library), checked."""
        lib = self.require_library()
        names = list(self.experts) if self.experts else lib.names()
        if not names:
            raise LorashelfError(
                f"library {lib.path} has no experts to use; train or import some first "
                f"(`lorashelf train ... --library {lib.path}`)"
            )
        known = set(lib.names())
        for n in names:
            if n not in known:
                raise LorashelfError(f"no expert {n!r} in {lib.path}{did_you_mean(n, known)}")
        return names

    def require_library(self) -> Library:
        if self.library is None:
            raise LorashelfError("this method needs a library; pass the library directory")
        return self.library

    def factors(self, model: nn.Module, names: Sequence[str]) -> list[tuple[str, dict]]:
        """The experts' factors on ``model``'s device and dtype."""
        lib, p = self.require_library(), next(model.parameters())
        return [(n, lib.get(n).lora_factors(device=p.device, dtype=p.dtype)) for n in names]


@dataclass
class Prepared:
    """A model ready to score, plus per-task hooks and an undo."""

    model: nn.Module
    close: Callable[[], None] = lambda: None
    on_task: Callable[[Task], contextlib.AbstractContextManager[Any]] | None = None
    routing: dict[str, Any] = field(default_factory=dict)  # task -> RoutingStats
    info: dict[str, Any] = field(default_factory=dict)


Build = Callable[[nn.Module, MethodContext, Any, str], Prepared]


@dataclass(frozen=True)
class Method:
    """One zero-shot method: ``build(model, ctx, config, arg)`` modifies ``model`` in
    place until ``Prepared.close()``. ``kind`` is ``base``, ``expert``, ``merge`` or
    ``router`` (a router cannot become one static adapter)."""

    name: str
    kind: str
    summary: str
    build: Build
    config_cls: type | None = None
    arg: str | None = None  # the ``:ARG`` it takes, e.g. "NAME" for expert:NAME


def _base(model: nn.Module, ctx: MethodContext, config: Any, arg: str) -> Prepared:
    return Prepared(model=model)


def _expert(model: nn.Module, ctx: MethodContext, config: Any, arg: str) -> Prepared:
    if not arg:
        raise LorashelfError("use --method expert:NAME (or --expert NAME) to pick the expert")
    names = dataclasses.replace(ctx, experts=(arg,)).names()
    handle = attach(model, ctx.factors(model, names), weights=[1.0])
    return Prepared(model=model, close=handle.detach, info={"expert": arg})


def _oracle(model: nn.Module, ctx: MethodContext, config: Any, arg: str) -> Prepared:
    """The expert trained on the evaluated task (or on its mapped sibling): an upper bound."""
    names = ctx.names()
    handle = attach(model, ctx.factors(model, names), weights=[0.0] * len(names))
    chosen: dict[str, str] = {}

    @contextlib.contextmanager
    def on_task(task: Task) -> Iterator[None]:
        name = oracle_expert(ctx.require_library(), names, task.id, ctx.oracle)
        chosen[task.id] = name
        w = torch.zeros(len(names))
        w[names.index(name)] = 1.0
        handle.set_weights(w)
        yield

    return Prepared(model=model, close=handle.detach, on_task=on_task, info={"oracle": chosen})


def oracle_expert(
    library: Library, names: list[str], task_id: str, mapping: Mapping[str, str]
) -> str:
    """The expert whose card lists ``mapping.get(task_id, task_id)`` among its tasks."""
    target = mapping.get(task_id, task_id)
    for n in names:
        if target in library.get(n).tasks:
            return n
    raise LorashelfError(
        f"oracle: no expert in {library.path} was trained on {target}; map the task to a "
        f"training task with --oracle-map {task_id}=TRAIN_TASK, or use --method expert:NAME"
    )


def _merged(name: str) -> Build:
    def build(model: nn.Module, ctx: MethodContext, config: Any, arg: str) -> Prepared:
        from lorashelf.merge import merge

        names = ctx.names()
        experts = [f for _, f in ctx.factors(model, names)]
        applied = merge(experts, name, config).apply(model)
        return Prepared(model=model, close=applied.restore, info={"experts": names})

    return build


def _routed(name: str) -> Build:
    def build(model: nn.Module, ctx: MethodContext, config: Any, arg: str) -> Prepared:
        from lorashelf.route import build_routed_model

        lib, names = ctx.require_library(), ctx.names()
        sums = [lib.get(e).files.get("adapter_model.safetensors", "") for e in names]
        routed = build_routed_model(
            model, ctx.factors(model, names), name, config, checksums=sums,
            cache_dir=lib.path / "cache", library_dir=lib.path, tokenizer=ctx.tokenizer,
            home=ctx.home,
        )  # fmt: skip
        prepared = Prepared(model=model, close=routed.detach, info={"experts": routed.expert_names})

        @contextlib.contextmanager
        def on_task(task: Task) -> Iterator[None]:
            with routed.record() as stats:
                yield
            prepared.routing[task.id] = stats

        prepared.on_task = on_task
        return prepared

    return build


OWN = {
    "base": Method("base", "base", "the base model alone", _base),
    "expert": Method("expert", "expert", "the base model plus one expert", _expert, arg="NAME"),
    "oracle": Method("oracle", "expert", "each task's own (or mapped) expert: an upper bound", _oracle),
    "best-expert": Method(
        "best-expert", "expert", "the single expert with the lowest gold NLL: :test on the "
        "evaluated examples (an upper bound), :shots on 5 train shots (a fair baseline)",
        build_best_expert, BestExpertConfig, arg="test|shots",
    ),
}  # fmt: skip


def get_method(name: str) -> Method:
    """The method called ``name`` (``expert``, ``ties``, ``arrow``, ...)."""
    if name in OWN:
        return OWN[name]
    if name in MERGES:
        spec = MERGES.get(name)
        return Method(name, "merge", spec.summary, _merged(name), spec.config_cls)
    if name in ROUTERS:
        spec = ROUTERS.get(name)
        return Method(name, "router", spec.summary, _routed(name), spec.config_cls)
    known = method_names()
    raise LorashelfError(
        f"unknown method {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"
    )


def method_names() -> list[str]:
    """Every method name, without importing any method module."""
    return [*OWN, *MERGES.names(), *ROUTERS.names()]


def split_spec(spec: str) -> tuple[Method, str]:
    """``"expert:NAME"`` -> (the expert method, ``"NAME"``); checks the argument."""
    name, _, arg = spec.partition(":")
    method = get_method(name)
    if arg and method.arg is None:
        raise LorashelfError(f"method {name!r} takes no ':{arg}' argument")
    return method, arg


def make_config(method: Method, settings: Mapping[str, Any]) -> Any:
    """``method``'s options from the keys of ``settings`` its dataclass has (the rest
    belong to other methods); unset (None) values keep the dataclass default."""
    if method.config_cls is None:
        return None
    fields = {f.name: f for f in dataclasses.fields(method.config_cls)}
    given = {k: v for k, v in settings.items() if k in fields and v is not None}
    for key, value in given.items():
        _check_type(method.name, fields[key], value)
    return method.config_cls(**given)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(method: str, field: dataclasses.Field, value: Any) -> None:
    """A ``--set`` value of the wrong JSON type (``density=nan`` is the string "nan")
    is one line naming the option, not a TypeError inside the options class."""
    want = type(field.default)
    if want not in _TYPE_NAMES:
        return
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise LorashelfError(
            f"{method} option {field.name} must be {_TYPE_NAMES[want]}, got {value!r}"
        )


def check_settings(methods: Sequence[Method], settings: Mapping[str, Any]) -> None:
    """Every set key must be an option of at least one of ``methods``."""
    taken = {f.name for m in methods if m.config_cls for f in dataclasses.fields(m.config_cls)}
    for key, value in settings.items():
        if value is not None and key not in taken:
            which = ", ".join(m.name for m in methods)
            raise LorashelfError(
                f"option {key!r} is not an option of {which}{did_you_mean(key, taken)}"
                + (f"; their options: {', '.join(sorted(taken))}" if taken else "")
            )


def prepare(
    spec: str,
    model: nn.Module,
    ctx: MethodContext,
    settings: Mapping[str, Any] | None = None,
) -> Prepared:
    """Build method ``spec`` (``"arrow"``, ``"expert:NAME"``) on ``model`` in place."""
    method, arg = split_spec(spec)
    if method.kind != "base":
        ctx.require_library()
    return method.build(model, ctx, make_config(method, settings or {}), arg)


def fewshot_methods() -> Registry:
    """``fewshot``'s methods: composition's own (zero-shot, icl, lorahub, ...) plus every
    merge, built on the same candidate experts and scored once per task (they ignore
    the shots)."""
    from lorashelf.compose.registry import FEWSHOT_METHODS

    table: Registry = Registry("few-shot method")
    for name in FEWSHOT_METHODS.names():
        table.add(name, FEWSHOT_METHODS.get(name))
    for name in MERGES.names():
        if name not in table:
            table.add(name, _fewshot_merge(name))
    return table


def _fewshot_merge(name: str) -> Any:
    from lorashelf.compose.baselines import Built, FewShotMethod

    def build(ctx: Any) -> Built:
        from lorashelf.merge import merge

        applied = merge([f for _, f in ctx.experts], name).apply(ctx.base.model)
        return Built(ctx.base.model, ctx.task, applied.restore, {"via": f"merge:{name}"})

    return FewShotMethod(name, f"{MERGES.get(name).summary} (ignores the shots)", build, False)
