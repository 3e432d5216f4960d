"""A bounded load test of ``lorashelf serve`` from a second process over loopback.

The server runs as a subprocess on 127.0.0.1; this process sends 240 requests from
16 threads: a mix of the base model, single experts, a uniform merge, Arrow routing
and an explicit per-request weighting, a third of them streamed and some cancelled
mid-stream (the client closes the connection after two chunks). Every request that
is not cancelled must get the same greedy answer it gets alone (asked one at a time
before the load), the server's resident memory must stay flat after a warm-up
round, and the server must still answer afterwards. Bounded in count and time.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)  # about 15 s on 2 shared cores

CONCURRENCY = 16
ROUNDS = 4  # round 0 warms up; rounds 1.. are measured
PER_ROUND = 60  # 240 requests in all
RSS_BOUND_MIB = 48  # growth of VmRSS allowed after the warm-up round
MAX_TOKENS = 8

MODELS = [
    ("lib", None),
    ("lib/alpha", None),
    ("lib/beta", None),
    ("lib:uniform", None),
    ("lib:arrow", None),
    ("lib", {"weights": {"alpha": 0.7, "gamma": 0.3}}),
]
PROMPTS = ["hello", "The library", "def f(x):", "once upon a time, a"]


def _body(model: int, prompt: int, *, stream: bool = False, max_tokens: int = MAX_TOKENS):
    name, options = MODELS[model]
    body = {"model": name, "prompt": PROMPTS[prompt], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip
    if options:
        body["lorashelf"] = options
    return body


def _complete(client: httpx.Client, url: str, body: dict) -> str:
    if not body["stream"]:
        r = client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text, done = "", False
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    assert done, "the stream ended without data: [DONE]"
    return text


def _cancel(client: httpx.Client, url: str, body: dict) -> None:
    """Read two chunks of a long streamed answer, then hang up."""
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for _ in range(2):
            next(lines)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def _jobs(round_: int) -> list[tuple[str, int, int]]:
    """(action, model, prompt): every 3rd streamed, every 10th cancelled."""
    jobs = []
    for i in range(PER_ROUND):
        k = round_ * PER_ROUND + i
        action = "cancel" if k % 10 == 7 else "stream" if k % 3 == 0 else "plain"
        jobs.append((action, k % len(MODELS), (k // len(MODELS)) % len(PROMPTS)))
    return jobs


def test_load_mixed_models_streams_and_cancels(served, serve_kit, tmp_path):
    log = tmp_path / "server.log"
    proc, url = serve_kit.start_server(
        served.library.path, log, "--watch-s", "0", "--max-batch", str(CONCURRENCY)
    )
    limits = httpx.Limits(max_connections=2 * CONCURRENCY)
    client = httpx.Client(timeout=httpx.Timeout(120, connect=10), limits=limits)
    try:
        solo = {
            (m, p): _complete(client, url, _body(m, p))
            for m in range(len(MODELS))
            for p in range(len(PROMPTS))
        }
        assert len(set(solo.values())) > len(PROMPTS), "the models should not all agree"
        wrong: list[str] = []
        lock = threading.Lock()

        def run(job: tuple[str, int, int]) -> None:
            action, m, p = job
            if action == "cancel":
                _cancel(client, url, _body(m, p, stream=True, max_tokens=300))
                return
            got = _complete(client, url, _body(m, p, stream=action == "stream"))
            if got != solo[m, p]:
                with lock:
                    wrong.append(f"{MODELS[m]} {PROMPTS[p]!r}: {got!r} != {solo[m, p]!r}")

        rss = []
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for round_ in range(ROUNDS):
                list(pool.map(run, _jobs(round_)))  # re-raises the first failure
                rss.append(_rss_mib(proc.pid))
        assert not wrong, f"{len(wrong)} answers differ from their solo answers:\n" + "\n".join(
            wrong[:5]
        )
        print(f"server VmRSS (MiB) after each round: {[round(r) for r in rss]}")
        growth = max(rss[1:]) - rss[0]
        assert growth < RSS_BOUND_MIB, f"VmRSS grew {growth:.0f} MiB after warm-up: {rss}"

        assert proc.poll() is None, log.read_text()
        assert client.get(f"{url}/health").status_code == 200
        assert _complete(client, url, _body(4, 1)) == solo[4, 1]
    finally:
        client.close()
        serve_kit.stop_server(proc)
    assert "Traceback" not in log.read_text(), log.read_text()
