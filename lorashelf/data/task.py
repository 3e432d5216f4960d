"""Tasks and examples: the unit of data every other part of lorashelf consumes.

A task is an id (``SOURCE:NAME``) plus examples. An example holds the *rendered*
prompt (everything the model reads before answering, e.g. BIG-bench prefixes already
applied) and what a correct answer looks like: for multiple choice the option
continuations and the gold index, for generative tasks one or more acceptable
targets. Training, scoring and composition all see the same text, so the prompt
format is decided once, by the source that parsed the task.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["mc", "gen"]


@dataclass(frozen=True)
class Example:
    """One example. ``prompt`` ends right where the answer starts.

    For multiple choice, ``options`` are the continuations scored after ``prompt``
    and ``answer`` is the gold index; ``target`` is then ``options[answer]``.
    For generation, ``targets`` lists every acceptable answer; ``target`` is the
    first (the one used for training).

    ``scores``, when a source has them (BIG-bench ``target_scores``), gives each
    option's credit: several options may share the top score ("3" and "three"), and
    a prediction is right when its score equals the maximum. ``answer`` is the first.
    """

    prompt: str
    target: str
    options: tuple[str, ...] = ()
    answer: int | None = None
    targets: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()

    @property
    def is_mc(self) -> bool:
        return bool(self.options)


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    valid: tuple[Example, ...]
    test: tuple[Example, ...]

    def get(self, name: str) -> tuple[Example, ...]:
        from lorashelf.errors import LorashelfError

        if name not in ("train", "valid", "test", "all"):
            raise LorashelfError(f"unknown split {name!r}; use train, valid, test or all")
        if name == "all":
            return self.train + self.valid + self.test
        return getattr(self, name)


@dataclass(frozen=True)
class Task:
    """A named set of examples from one source."""

    id: str
    examples: tuple[Example, ...]
    kind: Kind
    description: str = ""
    canary: str = ""
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # what seeds this task's shuffles (split, subset, shots); empty: its id. A JSONL
    # task's id is its path, so its source keys it on the content instead: the same
    # file splits the same wherever it lies.
    seed_key: str = ""

    @property
    def key(self) -> str:
        return self.seed_key or self.id

    @property
    def name(self) -> str:
        return self.id.split(":", 1)[1] if ":" in self.id else self.id

    def fingerprint(self) -> str:
        """sha256 over the examples' text: identifies the exact data used."""
        return examples_fingerprint(self.examples)

    def splits(self, seed: int = 0, valid_frac: float = 0.1, test_frac: float = 0.2) -> Splits:
        """Deterministic shuffle-and-cut; the same seed always gives the same split.

        Small tasks keep at least one valid and one test example when they have
        three or more examples in total.
        """
        idx = list(range(len(self.examples)))
        random.Random(f"{self.key}:{seed}").shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * test_frac)) if n >= 3 else 0
        n_valid = max(1, round(n * valid_frac)) if n >= 3 else 0
        test = tuple(self.examples[i] for i in idx[:n_test])
        valid = tuple(self.examples[i] for i in idx[n_test : n_test + n_valid])
        train = tuple(self.examples[i] for i in idx[n_test + n_valid :])
        return Splits(train=train, valid=valid, test=test)


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over the examples' text (16 hex digits)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.target, ex.options, ex.answer]).encode())
    return h.hexdigest()[:16]
