"""The registry of per-token routers: one line per method, imported on first use.

``eval --method``, ``serve``, ``generate`` and the contract tests find routers here. To
add one, write ``lorashelf/route/NAME.py`` with a frozen options dataclass (its
``top_k`` and ``mix`` fields are read by the mixture), a ``build(config, ctx)``
returning one router per module, and ``NAME = RouterMethod(...)``; then add its line.
"""

from __future__ import annotations

from lorashelf.registry import Registry

ROUTERS: Registry = Registry(
    "router",
    {
        "arrow": "lorashelf.route.arrow:ARROW",
        "phatgoose": "lorashelf.route.phatgoose:PHATGOOSE",
        "retrieval": "lorashelf.route.retrieval:RETRIEVAL",
    },
)
