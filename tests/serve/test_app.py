"""The HTTP API in process (FastAPI's TestClient): every endpoint and every error."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lorashelf.serve.app import create_app
from lorashelf.serve.compositions import Composition as C
from lorashelf.serve.sampling import SamplingParams


@pytest.fixture
def client(served):
    served.engine.start()
    with TestClient(create_app(served.engine)) as c:
        yield c
    served.engine.stop()


def _complete(client, **body):
    return client.post("/v1/completions", json={"temperature": 0, "max_tokens": 6} | body)


def test_models_lists_every_composition(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:4] == ["lib", "lib/alpha", "lib/beta", "lib/gamma"]
    assert {"lib:uniform", "lib:ties", "lib:arrow", "lib:dare-ties", "lib:wudi"} <= set(ids)
    assert "lib:retrieval" in ids
    assert "lib:phatgoose" not in ids  # no gates were trained


@pytest.mark.parametrize(
    "model,comp",
    [
        ("lib/beta", C("lib", "expert", ("beta",))),
        ("lib:arrow", C("lib", "arrow")),
        ("lib", C("lib")),
    ],
)
def test_completion_equals_the_engine(client, served, serve_kit, model, comp):
    (events,) = serve_kit.complete(served.engine, [("hello", comp, SamplingParams(max_tokens=6))])
    r = _complete(client, model=model, prompt="hello")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == serve_kit.text(events)
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["prompt_tokens"] == len(served.tokenizer("hello")["input_ids"])


def test_prompt_lists_and_token_ids(client, served):
    ids = served.tokenizer("hello")["input_ids"]
    body = _complete(client, model="lib/alpha", prompt=["hello", "bye"]).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    by_ids = _complete(client, model="lib/alpha", prompt=[ids, ids]).json()
    assert by_ids["choices"][0]["text"] == body["choices"][0]["text"]


def test_echo_logprobs_for_lm_eval(client, served):
    ids = served.tokenizer("hello world")["input_ids"]
    body = _complete(client, model="lib", prompt=ids, max_tokens=1, echo=True, logprobs=1).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert body["choices"][0]["text"].startswith("hello world")
    for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert tok <= max(top.values()) + 1e-6


def test_stream_matches_the_whole_answer(client):
    whole = _complete(client, model="lib:uniform", prompt="hello").json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"model": "lib:uniform", "prompt": "hello",
                       "max_tokens": 6, "temperature": 0, "stream": True}) as r:  # fmt: skip
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion(client):
    body = {"model": "lib/gamma", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5, "temperature": 0}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    )
    assert out["usage"]["completion_tokens"] == 5


def test_lorashelf_options_and_routing(client):
    opts = {"weights": {"alpha": 0.5, "beta": 0.5}, "return_routing": True}
    body = _complete(client, model="lib", prompt="hello", lorashelf=opts).json()
    routing = body["choices"][0]["lorashelf"]["routing"]
    assert len(routing) == 6
    assert {n for n, _ in routing[0]["experts"]} == {"lib/alpha", "lib/beta"}
    routed = _complete(client, model="lib", prompt="hello",
                       lorashelf={"method": "arrow", "experts": ["alpha", "gamma"], "top_k": 1,
                                  "return_routing": True}).json()  # fmt: skip
    for tok in routed["choices"][0]["lorashelf"]["routing"]:
        # top-1 per module, averaged over the layers: only the subset's experts appear
        assert {n for n, _ in tok["experts"]} <= {"lib/alpha", "lib/gamma"}
    ties = _complete(
        client, model="lib", prompt="hello", lorashelf={"merge": "ties", "density": 0.5}
    )
    assert ties.status_code == 200


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"model": "lib/alpah", "prompt": "x"}, 404, "model"),
        ({"model": "lib:arow", "prompt": "x"}, 404, "model"),
        ({"model": "lib", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": "lib", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "lib", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
        ({"model": "lib", "prompt": 3}, 400, "prompt"),
        ({"model": "lib", "prompt": [10**9]}, 400, "prompt"),
        ({"model": "lib", "prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x"}, 400, "model"),
        ({"model": "lib", "prompt": "x", "lorashelf": {"experts": ["nope"]}}, 400, None),
        ({"model": "lib", "prompt": "x", "lorashelf": {"colour": 1}}, 400, None),
        ({"model": "lib:arrow", "prompt": "x", "lorashelf": {"top_k": 0}}, 400, None),
        ({"model": "lib:arrow", "prompt": "x", "lorashelf": {"temperature": -1}}, 400, None),
        ({"model": "lib:ties", "prompt": "x", "lorashelf": {"density": 1.5}}, 400, None),
        ({"model": "lib", "prompt": "x" * 600}, 400, None),  # longer than the context (512)
    ],
)
def test_bad_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    if status == 404:
        assert "did you mean" in err["message"]
    assert client.get("/health").status_code == 200  # and the server is fine


def test_malformed_json_is_400(client):
    r = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_full_queue_is_503(served):
    from lorashelf.serve.engine import Engine, Request

    engine = Engine(served.bank, served.tokenizer, max_queue=1)  # never started: nothing drains
    engine.queue.put_nowait(Request([5], C("lib"), SamplingParams(), lambda ev: None))
    with TestClient(create_app(engine)) as c:
        r = c.post("/v1/completions", json={"model": "lib", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"


def test_api_key(served):
    with TestClient(create_app(served.engine, api_key="sekrit")) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200


def test_playground_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needed in ("/v1/models", "/v1/chat/completions", "return_routing", "stream: true"):
        assert needed in r.text
