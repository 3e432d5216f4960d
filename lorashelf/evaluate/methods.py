"""Reuse methods as models to evaluate: base, one expert, oracle, merges, routers.

``prepare(method, base, library, options)`` turns a method name into a
:class:`Prepared` model: the base model with the library's experts merged into it,
attached as a mixture with fixed weights, or routed per token. Evaluation then
scores it exactly as it scores the base model (lorashelf.evaluate.runner), so the
methods of Ostapenko et al. 2024 (arXiv 2405.11157) - base, private/MBC + uniform,
+ Arrow, oracle, TIES, PHATGOOSE - differ only in how the model was built.
A new method costs one function with ``@METHODS.register`` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import Library
from lorashelf.registry import Registry


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by the methods; each method reads the ones it needs."""

    experts: tuple[str, ...] | None = None  # a subset of the library (default: all)
    top_k: int | None = None  # arrow, phatgoose (None: the method's default, 4 and 2)
    temperature: float = 1.0  # arrow
    mix: str = "output"  # arrow: output or params mixing
    density: float = 0.2  # ties
    # oracle: held-out task -> the training task whose expert is its upper bound
    oracle: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Prepared:
    """A model ready to score, plus per-task hooks and an undo."""

    model: nn.Module
    close: Callable[[], None] = lambda: None
    on_task: Callable[[Task], contextlib.AbstractContextManager[Any]] | None = None
    routing: dict[str, Any] = field(default_factory=dict)  # task -> RoutingStats
    info: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[nn.Module, "Library | None", MethodOptions, str], Prepared]
METHODS: Registry[Builder] = Registry("method")


def prepare(
    method: str, model: nn.Module, library: Library | None, options: MethodOptions
) -> Prepared:
    """Build ``method`` on ``model`` (modified in place until ``Prepared.close()``)."""
    name, _, arg = method.partition(":")
    builder = METHODS.get(name)
    if name != "base" and library is None:
        raise LorashelfError(f"method {method!r} needs a library; pass --library DIR")
    return builder(model, library, options, arg)


def _names(library: Library, options: MethodOptions) -> list[str]:
    names = list(options.experts) if options.experts else library.names()
    if not names:
        raise LorashelfError(
            f"library {library.path} has no experts to use; train or import some first "
            f"(`lorashelf train ... --library {library.path}`)"
        )
    known = set(library.names())
    for n in names:
        if n not in known:
            raise LorashelfError(f"no expert {n!r} in {library.path}{did_you_mean(n, known)}")
    return names


def _factors(model: nn.Module, library: Library, names: list[str]) -> list[tuple[str, dict]]:
    p = next(model.parameters())
    return [(n, library.get(n).lora_factors(device=p.device, dtype=p.dtype)) for n in names]


@METHODS.register("base")
def _base(model: nn.Module, library: Library | None, options: MethodOptions, arg: str) -> Prepared:
    return Prepared(model=model)


@METHODS.register("expert")
def _expert(
    model: nn.Module, library: Library | None, options: MethodOptions, arg: str
) -> Prepared:
    from lorashelf.route import attach

    assert library is not None
    if not arg:
        raise LorashelfError("use --method expert:NAME (or --expert NAME) to pick the expert")
    names = _names(library, MethodOptions(experts=(arg,)))
    handle = attach(model, _factors(model, library, names), weights=[1.0])
    return Prepared(model=model, close=handle.detach, info={"expert": arg})


def _merge(kind: str, config: Any) -> Builder:
    def build(
        model: nn.Module, library: Library | None, options: MethodOptions, arg: str
    ) -> Prepared:
        from lorashelf.merge import merge

        assert library is not None
        names = _names(library, options)
        experts = [f for _, f in _factors(model, library, names)]
        applied = merge(experts, kind, config(options) if config else None).apply(model)
        return Prepared(model=model, close=applied.restore, info={"experts": names})

    return build


def _ties_config(options: MethodOptions) -> Any:
    from lorashelf.merge import TiesConfig

    return TiesConfig(density=options.density)


METHODS.register("uniform")(_merge("uniform", None))
METHODS.register("uniform-delta")(_merge("uniform-delta", None))
METHODS.register("ties")(_merge("ties", _ties_config))


def _router(kind: str) -> Builder:
    def build(
        model: nn.Module, library: Library | None, options: MethodOptions, arg: str
    ) -> Prepared:
        from lorashelf.route import build_routed_model

        assert library is not None
        names = _names(library, options)
        config = _router_config(kind, options, len(names), library)
        experts = _factors(model, library, names)
        sums = [library.get(n).files.get("adapter_model.safetensors", "") for n in names]
        routed = build_routed_model(
            model, experts, kind, config, checksums=sums, cache_dir=library.path / "cache"
        )
        prepared = Prepared(model=model, close=routed.detach, info={"experts": names})

        @contextlib.contextmanager
        def on_task(task: Task) -> Iterator[None]:
            with routed.record() as stats:
                yield
            prepared.routing[task.id] = stats

        prepared.on_task = on_task
        return prepared

    return build


def _router_config(kind: str, options: MethodOptions, n: int, library: Library) -> Any:
    from lorashelf.route import ROUTERS

    cls = ROUTERS.get(kind).config_cls
    top_k = options.top_k if options.top_k is not None else cls().top_k
    fields: dict[str, Any] = {"top_k": min(top_k, n)}
    if kind == "arrow":
        fields.update(temperature=options.temperature, mix=options.mix)
    if kind == "phatgoose":
        from lorashelf.route.gate_store import gates_dir

        fields["gates_dir"] = str(gates_dir(library.path))
    if top_k > n:
        import warnings

        warnings.warn(f"top-k {top_k} > {n} experts; using top-k {n}", stacklevel=2)
    return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


METHODS.register("arrow")(_router("arrow"))
METHODS.register("phatgoose")(_router("phatgoose"))


@METHODS.register("oracle")
def _oracle(
    model: nn.Module, library: Library | None, options: MethodOptions, arg: str
) -> Prepared:
    """The expert trained on the evaluated task (or on its mapped sibling): an upper bound."""
    from lorashelf.route import attach

    assert library is not None
    names = _names(library, options)
    handle = attach(model, _factors(model, library, names), weights=[0.0] * len(names))
    chosen: dict[str, str] = {}

    @contextlib.contextmanager
    def on_task(task: Task) -> Iterator[None]:
        name = oracle_expert(library, names, task.id, options.oracle)
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
