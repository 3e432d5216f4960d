"""The router protocol: what the mixture layer asks of a per-token router.

A router decides, token by token, how much each expert of one adapted module
contributes: it takes the layer input ``x [..., d_in]`` and returns weights
``[..., E_m]`` over the module's ``E_m`` present experts (in ``ExpertStack.members``
order, zero for experts not chosen). ``top_k`` (``int``, or ``None`` when its weights
are dense) lets the mixture layer gather only the chosen experts. Routing methods
(Arrow, PHATGOOSE, ...) live in :mod:`lorashelf.route` and build such routers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Router(Protocol):
    """Per-module token router: ``x [..., d_in] -> weights [..., E_m]``."""

    top_k: int | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
