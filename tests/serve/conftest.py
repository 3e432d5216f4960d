"""Fixtures for serving: a tiny float32 model with a library of random experts, the
bank and engine over it, and a helper that runs requests as one batch and collects
their events."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from lorashelf.serve.compositions import Composition
from lorashelf.serve.sampling import SamplingParams

EXPERTS = {"alpha": ["task:a"], "beta": ["task:b"], "gamma": ["task:c"]}


@pytest.fixture
def served(tiny_library, tiny_model, tiny_tokenizer):
    """(library, bank, engine) over a fresh copy of the tiny model; the engine's worker
    thread is not started (tests call run_batch, which batches exactly what they pass)."""
    from lorashelf.serve.bank import Bank
    from lorashelf.serve.engine import Engine

    lib = tiny_library(EXPERTS)
    bank = Bank(copy.deepcopy(tiny_model), {"lib": lib})
    engine = Engine(bank, tiny_tokenizer, max_batch=8)
    yield SimpleNamespace(library=lib, bank=bank, engine=engine, tokenizer=tiny_tokenizer)
    bank.close()


def complete(engine, jobs, *, return_routing=False):
    """Run ``jobs`` ([(prompt text, Composition, SamplingParams)]) as ONE batch; return
    each job's events."""
    from lorashelf.serve.engine import Request

    events = [[] for _ in jobs]
    reqs = [
        Request(
            engine.tokenizer(text)["input_ids"], comp, params, events[i].append,
            return_routing=return_routing,
        )
        for i, (text, comp, params) in enumerate(jobs)
    ]  # fmt: skip
    engine.run_batch(reqs)
    return events


def tokens(events):
    return [e.token for e in events if e.kind == "token"]


def text(events):
    return "".join(e.text for e in events if e.kind in ("token", "done"))


@pytest.fixture(scope="session")
def serve_kit():
    return SimpleNamespace(
        complete=complete, tokens=tokens, text=text, Composition=Composition,
        SamplingParams=SamplingParams,
    )  # fmt: skip
