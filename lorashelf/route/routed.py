"""A base model routed over a library of experts: what ``lorashelf route``/eval use.

:func:`build_routed_model` looks the routing method up in the registry
(lorashelf.route.registry.ROUTERS), builds
one router per adapted module and attaches the mixture layers in place. The
:class:`RoutedModel` it returns forwards and generates like the model itself, is
accepted by the scorer (``get_base_model``), records routing statistics on demand
and restores the plain model with ``detach()`` (or on leaving a ``with`` block).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorashelf.route.arrow  # noqa: F401  (registers "arrow")
from lorashelf.config import to_dict
from lorashelf.errors import LorashelfError
from lorashelf.lora.mixture import MixtureHandle, attach
from lorashelf.lora.stack import Experts, check_experts
from lorashelf.route.registry import ROUTERS
from lorashelf.route.router import Router, RouterContext
from lorashelf.route.stats import RoutingStats, recording


class RoutedModel:
    """A model with routed mixture layers attached; call it like the model."""

    def __init__(self, model: nn.Module, handle: MixtureHandle, method: str, config: Any) -> None:
        self.model = model
        self.handle = handle
        self.method = method
        self.config = config

    @property
    def expert_names(self) -> list[str]:
        return self.handle.expert_names

    @property
    def routers(self) -> dict[str, Router]:
        return {m: layer.router for m, layer in self.handle.layers.items() if layer.router}

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: method, its config and the experts."""
        return {"method": self.method, "config": to_dict(self.config), "experts": self.expert_names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The model with the mixture layers in it (what lorashelf.evaluate unwraps)."""
        return self.model

    @contextmanager
    def record(self) -> Iterator[RoutingStats]:
        """``with routed.record() as stats:`` collects the mean weight of each expert."""
        with recording(self.model, self.handle.state, self.expert_names) as stats:
            yield stats

    def detach(self) -> None:
        for router in self.routers.values():  # hooks some routers keep on the model
            release = getattr(router, "release", None)
            if callable(release):
                release()
        self.handle.detach()

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def build_routed_model(
    model: nn.Module,
    experts: Experts,
    method: str = "arrow",
    config: Any = None,
    *,
    checksums: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    strategy: str = "auto",
    device: torch.device | str | None = None,
    library_dir: str | Path | None = None,
    tokenizer: Any = None,
    home: str | Path | None = None,
    extras: Mapping[str, Any] | None = None,
) -> RoutedModel:
    """Route ``model`` over ``experts`` (``[(name, {module path: factors})]``), in place.

    ``config`` defaults to the method's config class with its defaults; its ``mix``
    field (``"output"`` or ``"params"``) selects output or parameter mixing.
    ``checksums`` (one per expert) and ``cache_dir`` let the method reuse derived
    tensors (Arrow: ``cache_dir/arrow_prototypes.safetensors``). ``device`` is where
    routers are computed (default: where the factors are); they then move to their
    layers. ``tokenizer``, ``home`` (the data root) and ``extras`` reach the method's
    builder through its :class:`RouterContext` (retrieval routing embeds the experts'
    training prompts with them).
    """
    spec = ROUTERS.get(method)
    if config is None:
        config = spec.config_cls()
    elif not isinstance(config, spec.config_cls):
        raise LorashelfError(
            f"router {method!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}"
        )
    check_experts(experts)
    if spec.experts is not None:
        experts, checksums = spec.experts(config, experts, checksums)
    if getattr(config, "top_k", 0) > len(experts) > 0:  # counted after the rewrite above
        warnings.warn(
            f"{method} top_k={config.top_k} exceeds the {len(experts)} experts; "
            f"using top_k={len(experts)}",
            stacklevel=2,
        )
        config = dataclasses.replace(config, top_k=len(experts))
    ctx = RouterContext(
        experts=experts,
        checksums=checksums,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        device=device,
        library_dir=Path(library_dir) if library_dir is not None else None,
        extras=dict(extras or {}),
        model=model,
        tokenizer=tokenizer,
        home=Path(home) if home is not None else None,
    )
    routers = spec.build(config, ctx)
    handle = attach(model, experts, mix=getattr(config, "mix", "output"), strategy=strategy)
    handle.set_routers(routers)
    return RoutedModel(model, handle, method, config)
