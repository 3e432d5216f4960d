"""Gradient-free searches over the expert weights, behind one ask/tell protocol.

LoraHub (Huang et al. 2023, arXiv 2307.13269) minimises its few-shot loss with
nevergrad's ``NGOpt`` (the paper describes CMA-ES), starting from all-zero weights
inside ``[-1.5, 1.5]``. ``ngopt`` is that search: with ``popsize=None`` it asks for
one candidate at a time, as the reference's ``minimize`` does (nevergrad then picks
its sequential algorithm; in nevergrad 1.0 that is Cobyla), and recommends what
nevergrad recommends; ``popsize=P`` declares P workers and asks P candidates per
round (nevergrad then picks a parallel algorithm, a CMA-based MetaModel in 1.0). ``cma`` runs CMA-ES from the ``cma`` package and asks for a
whole generation at once, which the scorer evaluates in one batched pass; it
recommends the best candidate evaluated. Both packages draw from numpy's global
random state, so every call runs inside a private :class:`RngScope`: results depend
on the seed alone and the caller's random state is left untouched.
``adam`` (gradient descent on the weights) is registered here too, as a gradient
method; its loop lives in lorashelf.compose.gradient.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lorashelf.compose.config import ComposeConfig
from lorashelf.errors import LorashelfError
from lorashelf.registry import Registry


class Search(Protocol):
    """Ask for candidates (one generation), tell their losses, recommend at the end."""

    def ask(self) -> list[np.ndarray]: ...

    def tell(self, xs: list[np.ndarray], losses: list[float]) -> None: ...

    def recommend(self) -> np.ndarray | None:
        """The final weights, or None for "the best candidate evaluated"."""
        ...


@dataclass(frozen=True)
class Optimiser:
    """A registry entry: ``make(n_experts, config) -> Search``, or a gradient method."""

    name: str
    summary: str
    make: Callable[[int, ComposeConfig], Search] | None = None
    gradient: bool = False


class RngScope:
    """A private numpy + ``random`` state swapped in for the length of a ``with`` block."""

    def __init__(self, seed: int) -> None:
        self._np = np.random.RandomState(seed).get_state()
        self._py = random.Random(seed).getstate()

    @contextmanager
    def active(self) -> Iterator[None]:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.set_state(self._np)
        random.setstate(self._py)
        try:
            yield
        finally:
            self._np, self._py = np.random.get_state(), random.getstate()
            np.random.set_state(saved_np)
            random.setstate(saved_py)


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LorashelfError(
            f"optimizer {extra!r} needs the package {module!r}: pip install {module} "
            f"(or pip install 'lorashelf[compose]'); or pick another with --optimizer"
        ) from None


class CmaSearch:
    """CMA-ES (``cma`` package) from zero with step ``sigma0``, bounded by the config."""

    def __init__(self, dim: int, config: ComposeConfig) -> None:
        cma = _require("cma", "cma")
        self.scope = RngScope(config.seed)
        lo, hi = config.bounds
        opts = {"bounds": [lo, hi], "seed": float("nan"), "verbose": -9, "verb_log": 0}
        if config.popsize is not None:
            opts["popsize"] = config.popsize
        with self.scope.active():  # seed=nan: cma samples from the scoped global state
            self.es = cma.CMAEvolutionStrategy(np.zeros(dim), config.sigma0, opts)
        self.popsize = int(self.es.popsize)

    def ask(self) -> list[np.ndarray]:
        with self.scope.active():
            return [np.asarray(x, dtype=np.float64) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], losses: list[float]) -> None:
        if len(xs) < self.popsize:  # the budget ran out mid-generation: nothing to learn
            return
        with self.scope.active():
            self.es.tell(xs, losses)

    def recommend(self) -> np.ndarray | None:
        return None


class NevergradSearch:
    """nevergrad's NGOpt over an Array initialised at 0, as the reference sets it up."""

    def __init__(self, dim: int, config: ComposeConfig) -> None:
        ng = _require("nevergrad", "ngopt")
        self.scope = RngScope(config.seed)
        lo, hi = config.bounds
        self.workers = config.popsize or 1
        with self.scope.active():
            param = ng.p.Array(init=[0.0] * dim, lower=[lo] * dim, upper=[hi] * dim)
            param.random_state = np.random.RandomState(config.seed)
            self.opt = ng.optimizers.NGOpt(
                parametrization=param, budget=config.budget, num_workers=self.workers
            )
        self.pending: list[Any] = []

    def ask(self) -> list[np.ndarray]:
        with self.scope.active():
            self.pending = [self.opt.ask() for _ in range(self.workers)]
        return [np.asarray(c.value, dtype=np.float64) for c in self.pending]

    def tell(self, xs: list[np.ndarray], losses: list[float]) -> None:
        with self.scope.active():
            for cand, loss in zip(self.pending, losses):
                self.opt.tell(cand, float(loss))

    def recommend(self) -> np.ndarray | None:
        with self.scope.active():
            return np.asarray(self.opt.provide_recommendation().value, dtype=np.float64)


OPTIMISERS: Registry[Optimiser] = Registry(
    "optimizer",
    {
        "cma": Optimiser(
            "cma", "CMA-ES (cma package); a whole generation per batched pass", CmaSearch
        ),
        "ngopt": Optimiser("ngopt", "nevergrad NGOpt, as the LoraHub reference", NevergradSearch),
        "adam": Optimiser(
            "adam", "Adam on the weights through the mixture (gradient baseline)", gradient=True
        ),
    },
)
