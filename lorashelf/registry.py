"""A tiny named registry with explicit, lazy entries (lm-eval's ``"module:object"``).

Each kind of method has one registry module that lists its entries by name, e.g.
``MERGES = Registry("merge method", {"ties": "lorashelf.merge.ties:TIES"})``. An entry
is imported on first ``get``, so listing names costs no import and nothing registers
itself as a side effect of importing a package; a new method costs one module plus
one line in its kind's registry (mergekit's ``merge_methods`` layout). ``add`` puts a
live object in at run time (a user's own method). Unknown names raise a
:class:`LorashelfError` with "did you mean" suggestions.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from lorashelf.errors import LorashelfError, did_you_mean

T = TypeVar("T")


def load_entry(path: str) -> object:
    """The object a ``"package.module:attribute"`` path names."""
    module, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"registry entry {path!r} must read 'module:object'")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """Maps names to objects, each given as a live object or a ``"module:object"`` path."""

    def __init__(self, kind: str, entries: Mapping[str, T | str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(entries or {})

    def add(self, name: str, obj: T | str) -> None:
        """Register ``obj`` (or a lazy path to it) under ``name``, refusing duplicates."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            entry = self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            known = ", ".join(sorted(self._entries))
            raise LorashelfError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None
        if isinstance(entry, str):
            entry = self._entries[name] = load_entry(entry)  # type: ignore[assignment]
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every (name, object), importing lazy entries."""
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
