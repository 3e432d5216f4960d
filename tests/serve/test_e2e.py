"""End to end: ``python -m lorashelf serve`` on 127.0.0.1 (a free port), talked to with
the official ``openai`` client, streaming and not; the library changes while it runs."""

from __future__ import annotations

import time

import httpx
import openai
import pytest


@pytest.fixture
def server(served, serve_kit, tmp_path):
    proc, url = serve_kit.start_server(
        served.library.path, tmp_path / "server.log", "--watch-s", "0.3", "--api-key", "k"
    )
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60), url
    serve_kit.stop_server(proc)


def _wait_for(pred, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_openai_client_end_to_end(server, served, serve_kit, tiny_library):
    client, url = server
    comp = serve_kit.Composition("lib", "expert", ("beta",))
    (events,) = serve_kit.complete(
        served.engine, [("hello", comp, serve_kit.SamplingParams(max_tokens=8))]
    )
    want = serve_kit.text(events)
    assert "lib:arrow" in [m.id for m in client.models.list()]
    out = client.completions.create(model="lib/beta", prompt="hello", max_tokens=8, temperature=0)
    assert out.choices[0].text == want and out.usage.completion_tokens == 8
    stream = client.completions.create(
        model="lib/beta", prompt="hello", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == want
    chat = client.chat.completions.create(
        model="lib:arrow", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, stream=True, extra_body={"lorashelf": {"top_k": 2, "return_routing": True}},
    )  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chat if c.choices]
    whole = client.chat.completions.create(
        model="lib:arrow", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, extra_body={"lorashelf": {"top_k": 2}},
    )  # fmt: skip
    assert "".join(deltas) == whole.choices[0].message.content

    # a client that leaves mid-stream frees its slot; the server keeps answering
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": "Bearer k"},
                      json={"model": "lib", "prompt": "x", "max_tokens": 400, "stream": True}) as r:  # fmt: skip
        next(r.iter_lines())
    assert (
        client.completions.create(model="lib", prompt="x", max_tokens=2).usage.completion_tokens
        == 2
    )

    with pytest.raises(openai.NotFoundError, match="did you mean"):
        client.completions.create(model="lib/bta", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    # the library is live: an added expert is served without a restart, a removed one is not
    tiny_library({"delta": ["task:d"]}, seed=9)  # adds to the served library
    ids = lambda: [m.id for m in client.models.list()]  # noqa: E731
    assert _wait_for(lambda: "lib/delta" in ids()), "the watcher did not pick up the new expert"
    assert client.completions.create(model="lib/delta", prompt="x", max_tokens=2).choices
    served.library.remove("alpha")
    assert _wait_for(lambda: "lib/alpha" not in ids())
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lib/alpha", prompt="x", max_tokens=2)
