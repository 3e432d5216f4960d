"""A tiny named registry for methods (merges, routers, clusterers, optimisers).

A new method costs one module plus one ``@REGISTRY.register("name")`` line, in the
spirit of mergekit's ``merge_methods`` and lm-eval's ``@register_model``. Unknown
names raise a :class:`LorashelfError` with "did you mean" suggestions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lorashelf.errors import LorashelfError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually functions or factories)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = did_you_mean(name, self._items)
            known = ", ".join(sorted(self._items))
            raise LorashelfError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
