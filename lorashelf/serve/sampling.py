"""Choosing the next token of each batch row, and turning tokens into streamed text.

Each row carries its own :class:`SamplingParams`: ``temperature == 0`` is greedy
(argmax), otherwise the logits are divided by the temperature, cut to the smallest
set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al.
2019, arXiv 1904.09751) and sampled with the row's own ``torch.Generator`` seeded from
the request's ``seed``, so a seeded request draws the same tokens whichever batch it
shares. :class:`TextStream` decodes a growing list of token ids into text deltas:
it holds back an incomplete UTF-8 character and any tail that could still become a
stop sequence, so a streamed answer never shows a stop string or half a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorashelf.errors import LorashelfError

MAX_LOGPROBS = 5


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: budget, sampling, stops and log-probabilities."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top log-probabilities per token (OpenAI: 0..5)
    echo: bool = False  # return the prompt (and its logprobs) before the answer
    ignore_eos: bool = False  # go on past end-of-sequence tokens (vLLM's option; benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise LorashelfError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise LorashelfError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LorashelfError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise LorashelfError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise LorashelfError("stop takes at most 4 non-empty strings")

    def generator(self) -> torch.Generator | None:
        """The row's random source (None for greedy rows)."""
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (a CPU long tensor ``[B]``)."""
    out = logits.argmax(-1).cpu()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            out[i] = sample_row(logits[i], p.temperature, p.top_p, g)
    return out


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Sample from ``softmax(logits / temperature)`` restricted to its top-p nucleus."""
    probs = (logits.float().cpu() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep each token whose preceding mass is below top_p (the first always stays)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` most likely token ids of one position and their log-probabilities."""
    if k == 0:
        return [], []
    vals, idx = logprobs.topk(k)
    return idx.tolist(), vals.tolist()


class TextStream:
    """Incremental detokenisation with stop sequences (one per request)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to emit (may be "")."""
        self.ids.append(token)
        text = self.text()
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at], len(text[:at]))
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # a tail that may grow into a stop sequence
            for n in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(text, safe)

    def flush(self) -> str:
        """What is left to emit when generation ends without a stop sequence."""
        if self.stopped:
            return ""
        return self._emit(self.text(), len(self.text()))

    def _emit(self, text: str, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = text[self.sent : upto], upto
        return delta

    def final_text(self) -> str:
        """The whole answer, cut before the first stop sequence."""
        text = self.text()
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        return text
