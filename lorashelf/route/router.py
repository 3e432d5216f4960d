"""The router protocol and the registry of routing methods.

A router decides, token by token, how much each expert of one adapted module
contributes. Zero-shot routers (Arrow, Ostapenko et al. 2024, arXiv 2405.11157;
PHATGOOSE, Muqeeth et al. 2024) are built from the experts alone, one router per
adapted module. Adding a method costs one module defining a frozen config dataclass
and a ``build`` function, plus one line in :mod:`lorashelf.route.registry`:

    @dataclass(frozen=True)
    class MyConfig:
        top_k: int = 4
        mix: str = "output"        # read by build_routed_model: "output" or "params"

    def build_my_routers(config: MyConfig, ctx: RouterContext) -> dict[str, Router]: ...

    MINE = RouterMethod(MyConfig, build_my_routers, "what it does")   # lorashelf/route/mine.py
    "mine": "lorashelf.route.mine:MINE",                              # route/registry.py

``ctx.experts`` is the list of ``(name, {module path: factors})``, ``ctx.stacks`` maps
each adapted module path to its :class:`~lorashelf.lora.stack.ExpertStack` (the
experts present there, stacked); the returned dict maps module paths to routers
(a module without a router adds nothing). A router is any callable (an
``nn.Module`` if it holds tensors, so it moves with the model) that takes the layer
input ``x [..., d_in]`` and returns weights ``[..., E_m]`` over the module's ``E_m``
present experts, in ``stack.members`` order, zero for experts not chosen. It
exposes ``top_k`` (``int``, or ``None`` when its weights are dense), which lets the
mixture layer gather only the chosen experts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lorashelf.lora.router import Router
from lorashelf.lora.stack import Experts, ExpertStack, stack_experts


@dataclass(frozen=True)
class RouterContext:
    """What a router builder may use besides the factors.

    ``checksums`` (one per expert, in the experts' order, e.g. the sha256 of each
    adapter_model.safetensors) key derived tensors in ``cache_dir`` so they are
    computed once per expert; ``None`` disables caching.
    """

    experts: Experts
    checksums: Sequence[str] | None = None
    cache_dir: Path | None = None
    device: torch.device | str | None = None  # where to compute (None: where the factors are)
    library_dir: Path | None = None  # the library the experts come from (its derived files)
    extras: Mapping[str, Any] = field(default_factory=dict)  # method-specific inputs
    # the base model the routers will sit in, before the mixture is attached, and its
    # tokenizer and data home: what data-based routers (retrieval) embed inputs with
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    home: Path | None = None

    @property
    def expert_names(self) -> list[str]:
        return [name for name, _ in self.experts]

    @cached_property
    def stacks(self) -> dict[str, ExpertStack]:
        """Each adapted module's experts, stacked (computed on first use)."""
        return stack_experts(self.experts, device=self.device)


@dataclass(frozen=True)
class RouterMethod:
    """A routing method as :mod:`lorashelf.route.registry` lists it: its frozen options
    dataclass, the function building its routers, a one-line summary and optionally a
    rewrite of the experts it routes over."""

    config_cls: type
    build: Callable[[Any, RouterContext], dict[str, Router]]
    summary: str = ""
    # rewrites (experts, checksums) before routing, e.g. GenKnowSub's subtraction; the
    # mixture then computes the rewritten experts
    experts: Callable[[Any, Experts, Sequence[str] | None], tuple[Experts, Any]] | None = None
