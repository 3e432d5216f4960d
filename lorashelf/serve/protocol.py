"""The OpenAI wire format: request bodies in, response bodies and stream chunks out.

Bodies are read as plain JSON and checked field by field, so every bad value gets
a 400 whose OpenAI-shaped error names the offending ``param``. Completions take a
string, a list of strings, a list of token ids or a list of such lists (what
lm-evaluation-harness's ``local-completions`` sends with ``tokenized_requests``);
``echo`` + ``logprobs`` return the prompt tokens' log-probabilities in the legacy
``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``). Chat messages go through the tokenizer's chat template, or, for
base models without one, a plain ``role: content`` transcript ending in
``assistant:``. lorashelf's own options travel in a ``lorashelf`` object (the
``openai`` client's ``extra_body``), and routing comes back in ``choice["lorashelf"]``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lorashelf.errors import LorashelfError
from lorashelf.serve.sampling import SamplingParams

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's legacy default; chat's cap


class ParamError(LorashelfError):
    """A bad request parameter (the server's 400); ``param`` names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Parsed:
    """A validated request: prompts (token ids), sampling, model, options, streaming."""

    model: str
    prompts: list[list[int]]
    params: SamplingParams
    options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    return_routing: bool = False


def _get(body: dict, key: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise ParamError(f"{key} must be {' or '.join(t.__name__ for t in types)}", key)
    if not isinstance(value, types):
        raise ParamError(f"{key} must be {' or '.join(t.__name__ for t in types)}", key)
    return value


def parse(body: Any, kind: str, tokenizer: Any) -> Parsed:
    """Check a completion (``kind="completion"``) or chat (``"chat"``) request body."""
    if not isinstance(body, dict):
        raise ParamError("the request body must be a JSON object")
    model = _get(body, "model", (str,))
    if not model:
        raise ParamError("model is required; GET /v1/models lists the served ids", "model")
    if _get(body, "n", (int,), 1) != 1:
        raise ParamError("n > 1 is not supported; send n requests", "n")
    prompts = _prompts(body, tokenizer) if kind == "completion" else [_chat(body, tokenizer)]
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ParamError("stop must be a string or a list of strings", "stop")
    if kind == "completion":
        logprobs = _get(body, "logprobs", (int,))
        echo = _get(body, "echo", (bool,), False)
    else:
        want = _get(body, "logprobs", (bool,), False)
        logprobs = _get(body, "top_logprobs", (int,), 0) if want else None
        echo = False
    lorashelf = _get(body, "lorashelf", (dict,), {})
    options = {k: v for k, v in lorashelf.items() if k != "return_routing"}
    try:
        params = SamplingParams(
            max_tokens=_get(body, "max_completion_tokens", (int,), None)
            or _get(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS[kind]),
            temperature=float(_get(body, "temperature", (int, float), 1.0)),
            top_p=float(_get(body, "top_p", (int, float), 1.0)),
            seed=_get(body, "seed", (int,)),
            stop=tuple(stop),
            logprobs=logprobs,
            echo=echo,
            ignore_eos=_get(body, "ignore_eos", (bool,), False),
        )
    except LorashelfError as e:
        raise ParamError(str(e), str(e).split(" ", 1)[0]) from None
    stream_options = _get(body, "stream_options", (dict,), {})
    return Parsed(
        model=model, prompts=prompts, params=params, options=options,
        stream=_get(body, "stream", (bool,), False),
        include_usage=bool(stream_options.get("include_usage")),
        return_routing=bool(lorashelf.get("return_routing", False)),
    )  # fmt: skip


def _prompts(body: dict, tokenizer: Any) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_checked_ids(prompt, tokenizer)]
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer(p)["input_ids"] for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [_checked_ids(p, tokenizer) for p in prompt]
    raise ParamError(
        "prompt must be a string, a list of strings, a list of token ids or a list of those",
        "prompt",
    )


def _checked_ids(ids: list, tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise ParamError(f"token ids must be integers in [0, {vocab})", "prompt")
    return list(ids)


def _chat(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )  # fmt: skip
    if not ok:
        raise ParamError("messages must be a non-empty list of {role, content} strings", "messages")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


# ---------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, rid: str, model: str, choices: list, chunk: bool = False) -> dict:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[kind]
    if chunk and kind == "chat":
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices}  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobsBuilder:
    """The legacy completions ``logprobs`` object, token by token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}  # fmt: skip
        self.offset = 0

    def add(self, token: int, logprob: float | None, top: dict[int, float] | None) -> None:
        text = self.tokenizer.decode([token])
        self.out["tokens"].append(text)
        self.out["token_logprobs"].append(logprob)
        named = None if top is None else {self.tokenizer.decode([t]): v for t, v in top.items()}
        self.out["top_logprobs"].append(named)
        self.out["text_offset"].append(self.offset)
        self.offset += len(text)
