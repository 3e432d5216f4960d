"""Base-model loading (hub id, local dir, GGUF, embedded default) and caching."""

from lorashelf.models.known import DEFAULT_MODEL, canonical_id, same_base
from lorashelf.models.load import BaseModel, list_cached, load_base, pull

__all__ = [
    "DEFAULT_MODEL",
    "BaseModel",
    "canonical_id",
    "list_cached",
    "load_base",
    "pull",
    "same_base",
]
