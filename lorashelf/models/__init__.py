"""Base-model loading (hub id, local dir, GGUF, embedded default) and caching.

``known`` (ids and aliases) is light; the loader imports transformers, so it is
imported only when first used (``from lorashelf.models import same_base`` stays fast
for the library's writers).
"""

from __future__ import annotations

from typing import Any

from lorashelf.models.known import DEFAULT_MODEL, canonical_id, same_base

_LAZY = {"BaseModel", "list_cached", "load_base", "pull"}

__all__ = [
    "DEFAULT_MODEL",
    "BaseModel",
    "canonical_id",
    "list_cached",
    "load_base",
    "pull",
    "same_base",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lorashelf.models import load

        return getattr(load, name)
    raise AttributeError(f"module 'lorashelf.models' has no attribute {name!r}")
