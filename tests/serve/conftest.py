"""Fixtures for serving: a tiny float32 model with a library of random experts, the
bank and engine over it, a helper that runs requests as one batch and collects
their events, and ``start_server``: ``python -m lorashelf serve`` as a subprocess on
127.0.0.1 and a free port."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
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
    bank = Bank(copy.deepcopy(tiny_model), {"lib": lib}, tokenizer=tiny_tokenizer)
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
        SamplingParams=SamplingParams, start_server=start_server, stop_server=stop_server,
    )  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(library: Path, log: Path, *options: str, timeout: float = 120.0):
    """``lorashelf serve LIBRARY`` (cpu, fp32, one thread) on 127.0.0.1; (process, base
    url) once /health answers. The caller terminates the process."""
    import httpx

    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorashelf", "--device", "cpu", "--threads", "1", "serve",
           str(library), "--port", str(port), "--dtype", "fp32", *options]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None:
                pytest.fail("the server exited: " + log.read_text())
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the server did not start in {timeout:.0f} s: " + log.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
