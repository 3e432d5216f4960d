"""``lorashelf serve``: the OpenAI-compatible HTTP API over a bank of experts (FastAPI).

``GET /v1/models`` lists every servable composition, ``POST /v1/completions`` and
``POST /v1/chat/completions`` generate (streaming as Server-Sent Events ending in
``data: [DONE]``), ``POST /v1/reload`` re-reads the libraries (a watcher thread also
does it when a library's index changes), ``GET /`` is the playground page. Every
request becomes one engine request per prompt; the engine's events come back to the
event loop through an ``asyncio.Queue``. A client that goes away cancels its
requests, which the engine drops at its next step. Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from lorashelf.errors import LorashelfError
from lorashelf.serve import protocol
from lorashelf.serve.compositions import UnknownModel, parse_model_id, with_options
from lorashelf.serve.engine import Engine, Event, QueueFull
from lorashelf.serve.engine import Request as EngineRequest
from lorashelf.serve.protocol import LogprobsBuilder, ParamError, error_body
from lorashelf.serve.watch import LibraryWatcher

log = logging.getLogger("lorashelf.serve")
STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeConfig:
    libraries: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    window_s: float = 0.01
    watch_s: float = 2.0
    model: str | None = None
    dtype: str | None = None
    lora_dtype: str = "model"


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            503: "server_overloaded"}.get(status, "server_error")  # fmt: skip
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def create_app(engine: Engine, *, api_key: str | None = None, watch_s: float = 0.0) -> FastAPI:
    """The app over a started ``engine`` (its watcher polls every ``watch_s`` s; 0: off)."""
    bank, tokenizer = engine.bank, engine.tokenizer
    watcher = LibraryWatcher(bank.libraries.values(), engine.request_reload, watch_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher.start()
        yield
        watcher.stop()

    app = FastAPI(title="lorashelf", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.watcher = engine, watcher

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key")  # fmt: skip
        return await call_next(request)

    @app.get("/")
    def _playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def _health() -> dict:
        return {"status": "ok", "experts": len(bank.factors)}

    @app.get("/v1/models")
    def _models() -> dict:
        data = [{"id": c.model_id(), "object": "model", "created": 0, "owned_by": "lorashelf",
                 "lorashelf": {"library": c.library, "kind": c.kind, "routed": c.routed}}
                for c in bank.compositions()]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/reload")
    async def _reload() -> dict:
        await asyncio.to_thread(engine.request_reload)
        return {"experts": sorted(bank.factors), "models": len(bank.compositions())}

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await _serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        return await _serve(request, "chat")

    async def _serve(request: Request, kind: str):
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return _error(400, f"the body is not valid JSON: {e}")
        try:
            parsed = protocol.parse(body, kind, tokenizer)
            comp = parse_model_id(parsed.model, list(bank.libraries), bank.model_ids())
            comp = with_options(comp, parsed.options)
            bank.resolve(comp)
            for ids in parsed.prompts:
                engine.check(ids, parsed.params)
        except UnknownModel as e:
            return _error(404, str(e), "model", "model_not_found")
        except ParamError as e:
            return _error(400, str(e), e.param)
        except LorashelfError as e:
            return _error(400, str(e))
        call = _Call(engine, kind, parsed, comp)
        try:
            call.submit()
        except QueueFull as e:
            return _error(503, f"{e}; retry later")
        if parsed.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream")
        try:
            return await call.collect()
        finally:
            call.cancel()

    return app


class _Call:
    """One HTTP request: its engine requests and the queue their events arrive on."""

    def __init__(self, engine: Engine, kind: str, parsed: protocol.Parsed, comp: Any) -> None:
        self.engine, self.kind, self.parsed = engine, kind, parsed
        self.tokenizer = engine.tokenizer
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.id = protocol.new_id(kind)
        self.requests = [
            EngineRequest(ids, comp, parsed.params, self._listener(i),
                          return_routing=parsed.return_routing)
            for i, ids in enumerate(parsed.prompts)
        ]  # fmt: skip

    def _listener(self, index: int):
        def on_event(ev: Event) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, ev))

        return on_event

    def submit(self) -> None:
        try:
            for req in self.requests:
                self.engine.submit(req)
        except QueueFull:
            self.cancel()
            raise

    def cancel(self) -> None:
        for req in self.requests:
            req.cancelled = True

    async def _events(self) -> AsyncIterator[tuple[int, Event]]:
        open_ = len(self.requests)
        while open_:
            index, ev = await self.events.get()
            if ev.kind in ("done", "error"):
                open_ -= 1
            yield index, ev

    async def collect(self):
        texts = [""] * len(self.requests)
        logprobs = [LogprobsBuilder(self.tokenizer) for _ in self.requests]
        routing: list[list] = [[] for _ in self.requests]
        finish: list[str | None] = [None] * len(self.requests)
        completion_tokens = 0
        async for i, ev in self._events():
            if ev.kind == "error":
                return _error(ev.status, ev.text)
            if ev.kind == "prompt":
                texts[i] += ev.text
                for j, t in enumerate(ev.tokens):
                    logprobs[i].add(t, (ev.logprobs or [None] * len(ev.tokens))[j],
                                    ev.tops[j] if ev.tops else None)  # fmt: skip
                continue
            texts[i] += ev.text
            if ev.kind == "token":
                completion_tokens += 1
                logprobs[i].add(ev.token, ev.logprob, ev.top)
                routing[i].append(_routing(self.tokenizer, ev))
            else:
                finish[i] = ev.finish_reason
        choices = []
        for i, text in enumerate(texts):
            choice: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = (
                    _chat_logprobs(logprobs[i]) if self.parsed.params.logprobs is not None else None
                )
            else:
                choice["text"] = text
                choice["logprobs"] = (
                    logprobs[i].out if self.parsed.params.logprobs is not None else None
                )
            if self.parsed.return_routing:
                choice["lorashelf"] = {"routing": routing[i]}
            choices.append(choice)
        body = protocol.envelope(self.kind, self.id, self.parsed.model, choices)
        n_prompt = sum(len(r.prompt) for r in self.requests)
        body["usage"] = protocol.usage(n_prompt, completion_tokens)
        return JSONResponse(body)

    async def stream(self) -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            if self.kind == "chat":
                yield self._sse(0, {"role": "assistant", "content": ""}, None)
            async for i, ev in self._events():
                if ev.kind == "error":
                    yield f"data: {json.dumps(error_body(ev.text, 'server_error'))}\n\n"
                    break
                if ev.kind == "prompt" and ev.text:
                    yield self._sse(i, ev.text, None)
                elif ev.kind == "token":
                    completion_tokens += 1
                    extra = {"routing": [_routing(self.tokenizer, ev)]} if ev.routing else None
                    if ev.text or extra:
                        yield self._sse(i, ev.text, None, extra)
                elif ev.kind == "done":
                    yield self._sse(i, ev.text, ev.finish_reason)
            if self.parsed.include_usage:
                body = protocol.envelope(self.kind, self.id, self.parsed.model, [], chunk=True)
                n_prompt = sum(len(r.prompt) for r in self.requests)
                body["usage"] = protocol.usage(n_prompt, completion_tokens)
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the engine's rows
            self.cancel()

    def _sse(self, index: int, text: Any, finish: str | None, extra: dict | None = None) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if self.kind == "chat":
            choice["delta"] = (
                text if isinstance(text, dict) else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text
        if extra:
            choice["lorashelf"] = extra
        body = protocol.envelope(self.kind, self.id, self.parsed.model, [choice], chunk=True)
        return f"data: {json.dumps(body)}\n\n"


def _routing(tokenizer: Any, ev: Event) -> dict:
    return {"token": tokenizer.decode([ev.token]), "experts": ev.routing or []}


def _chat_logprobs(built: LogprobsBuilder) -> dict:
    out = built.out
    content = [{"token": t, "logprob": lp,
                "top_logprobs": [{"token": k, "logprob": v} for k, v in (top or {}).items()]}
               for t, lp, top in zip(out["tokens"], out["token_logprobs"], out["top_logprobs"])]  # fmt: skip
    return {"content": content}


def run_server(config: ServeConfig, *, home: Path, device: Any) -> None:
    """Load the libraries' base model, start the engine and serve until interrupted."""
    import uvicorn

    from lorashelf.serve.loading import load_bank

    check_address(config.host, config.port)  # before the minutes of loading a model
    bank, tokenizer = load_bank(config.libraries, home=home, device=device, dtype=config.dtype,
                                model=config.model, lora_dtype=config.lora_dtype)  # fmt: skip
    engine = Engine(bank, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                    window_s=config.window_s).start()  # fmt: skip
    app = create_app(engine, api_key=config.api_key, watch_s=config.watch_s)
    n = len(bank.compositions())
    print(f"lorashelf: serving {n} models on http://{config.host}:{config.port}/v1 "
          f"(playground: http://{config.host}:{config.port}/)", flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()
        bank.close()


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on (a port in use,
    an unknown host), which uvicorn reports only after startup, with a traceback."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise LorashelfError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or --host"
        ) from None
