"""What a job is, which jobs are left, and how a finished one enters the library.

A job is anything with a ``name``: the name its output takes in the library. The
resume rule is "skip what the library already has": a job whose name the library (a
:class:`Shelf`) lists is done, so rerunning after an interruption does only the rest.
The hand-over is atomic: the work function writes into a fresh staging directory
inside the library (``Library.staging_dir``: locked while in use, so the next write
to the library deletes a killed job's leftovers, and nothing is left in the system
temp dir), and only a finished directory is added, in one ``add`` call that stages
and renames on the same filesystem (``Library.add``), so a crash or Ctrl-C leaves
whole outputs or none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Job:
    """One expert to train: its name in the library and the task ids it learns."""

    name: str
    tasks: tuple[str, ...]


class Named(Protocol):
    @property
    def name(self) -> str: ...


J = TypeVar("J", bound=Named)
R = TypeVar("R")


@dataclass(frozen=True)
class Output(Generic[R]):
    """What a work function hands back: the card stored with its output, and its result."""

    card: Mapping[str, Any]
    result: R


# Makes one job's output in ``out_dir`` (which it creates) and returns its card + result.
Work = Callable[[J, Path], Output[R]]


class Shelf(Protocol):
    """Where finished work goes: a :class:`~lorashelf.library.Library`, or a stand-in."""

    def names(self) -> list[str]: ...

    def add(self, src: Path, *, name: str, card: Mapping[str, Any]) -> Any: ...

    def staging_dir(self, prefix: str) -> AbstractContextManager[Path]: ...


def pending(jobs: Sequence[J], shelf: Shelf) -> list[J]:
    """The jobs whose name ``shelf`` does not list yet, in order."""
    have = set(shelf.names())
    return [j for j in jobs if j.name not in have]


def hand_over(work: Work[J, R], job: J, shelf: Shelf) -> R:
    """Run ``work`` for ``job`` in a staging directory of ``shelf``, then add the result."""
    with shelf.staging_dir("job--") as tmp:
        out = tmp / job.name
        made = work(job, out)
        shelf.add(out, name=job.name, card=made.card)
    return made.result
