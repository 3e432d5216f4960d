"""Batched generation: a bounded queue, a short batching window, one KV-cached decode loop.

Requests wait in a bounded queue (a full queue is refused at once, the server's 503).
The worker thread takes the first waiting request, waits up to ``window_s`` for more
(up to ``max_batch``) and prefills them as one batch: the prompts are left-padded,
the attention mask hides the padding and the position ids count only real tokens
(``cumsum(mask) - 1``), so every row sees exactly the positions and keys it would see
alone; then each decode step feeds every live row its last token. A row that
finishes (end of sequence, a stop string, its token budget) or whose client went
away is dropped from the cache and the plan, so the others do not pay for it.
Batching is continuous (Orca, Yu et al. OSDI 2022; vLLM): between two decode steps,
requests that arrived meanwhile are prefilled on their own and join the running
batch, their KV cache and mask left-padded to its length, so a request never waits
for a whole batch to finish. A retrieval request's experts are picked from its prompt when it
is admitted (the bank embeds the prompts with the base model), so it then runs as a
fixed weighting, or Arrow over the retrieved experts. The library is re-read between batches, never under a
running one (no request joins while a reload waits).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorashelf.errors import LorashelfError
from lorashelf.serve.bank import Bank
from lorashelf.serve.compositions import Composition, UnknownModel
from lorashelf.serve.kvbatch import Batch, concat, joinable, left_padded, new_cache
from lorashelf.serve.sampling import SamplingParams, TextStream, next_tokens, top_logprobs

log = logging.getLogger("lorashelf.serve")
_ids = itertools.count()


class QueueFull(Exception):
    """The engine's queue is full; the client should retry later."""


@dataclass
class Event:
    """What the engine reports about a request, in order: ``prompt`` (echo), ``token``
    (one per generated token), then ``done`` or ``error``."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None  # token id -> logprob
    routing: list[tuple[str, float]] | None = None  # top experts of this token
    tokens: list[int] | None = None  # prompt: its ids
    logprobs: list[float | None] | None = None  # prompt: each token's logprob
    tops: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    status: int = 500  # error: the HTTP status it maps to


@dataclass
class Request:
    """One prompt to complete with one composition; events go to ``on_event``."""

    prompt: list[int]
    composition: Composition
    params: SamplingParams
    on_event: Callable[[Event], None]
    return_routing: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set by the client side; the row is dropped at the next step
    created: float = field(default_factory=time.monotonic)


class _Row:
    """A request while its batch runs."""

    def __init__(self, req: Request, spec: Any, tokenizer: Any) -> None:
        self.req, self.spec = req, spec
        self.stream = TextStream(tokenizer, req.params.stop)
        self.generator = req.params.generator()
        self.generated = 0
        self.done = False  # its last event (done or error) was sent


class Engine:
    """Owns the model on one worker thread; ``submit`` from any thread."""

    def __init__(
        self,
        bank: Bank,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        window_s: float = 0.01,
    ) -> None:
        self.bank, self.tokenizer = bank, tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue[Request] = queue.Queue(max_queue)
        self.context = int(getattr(bank.model.config, "max_position_embeddings", 2048))
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(bank.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._reload = threading.Event()
        self._reloaded = threading.Condition()
        self._reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # held while the model runs (a batch or a reload)

    # ------------------------------------------------------------ client side
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse a request that cannot fit the model's context (the server's 400)."""
        if not prompt:
            raise LorashelfError("the prompt is empty; send at least one token")
        if len(prompt) + params.max_tokens > self.context:
            raise LorashelfError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}, "
                f"more than the model's context of {self.context} tokens; shorten the prompt "
                "or lower max_tokens"
            )

    def submit(self, req: Request) -> None:
        self.check(req.prompt, req.params)
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.queue.maxsize} requests)") from None

    def request_reload(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Re-read the libraries between batches (wait for it unless ``wait=False``)."""
        with self._reloaded:
            target = self._reloads + 1
            self._reload.set()
            if wait:
                self._reloaded.wait_for(lambda: self._reloads >= target, timeout)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="lorashelf-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._reload.is_set():
                self._do_reload()
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(
                        self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                    )
                except queue.Empty:
                    break
            self.run_batch(batch)

    def _do_reload(self) -> None:
        with self._reloaded:
            self._reload.clear()
            try:
                with self.lock:
                    if self.bank.refresh():
                        log.info("library changed: now serving %d experts", len(self.bank.factors))
            except Exception:  # a broken library must not stop the server
                log.exception("reloading the libraries failed; still serving the previous state")
            self._reloads += 1
            self._reloaded.notify_all()

    def run_batch(self, batch: list[Request]) -> None:
        """Run ``batch`` to the end (admitting waiting requests as rows finish); every
        request gets its events (errors included)."""
        rows: list[_Row] = []
        try:
            with self.lock, torch.inference_mode():
                rows += self._admit(batch)
                if rows:
                    self._generate(rows)
        except Exception as e:  # never let one batch kill the worker
            log.exception("a batch failed")
            for row in rows:
                if not row.done:
                    _emit(row.req, Event("error", text=f"generation failed: {e}", status=500))

    def _admit(self, batch: list[Request]) -> list[_Row]:
        """The rows of ``batch``'s requests; a request that cannot run gets its error
        event (404 unknown model, 400 bad options, 500 a server-side failure)."""
        resolved: list[tuple[Request, Any]] = []
        for req in batch:
            if req.cancelled:
                continue
            try:
                resolved.append((req, self.bank.resolve(req.composition)))
            except UnknownModel as e:
                _emit(req, Event("error", text=str(e), status=404))
            except LorashelfError as e:
                _emit(req, Event("error", text=str(e), status=400))
        resolved = self._retrieve(resolved)
        rows = []
        for req, spec in resolved:
            try:
                self.bank.ready(spec)  # e.g. damaged gates: this request fails, not the batch
            except Exception as e:
                _emit(req, Event("error", text=_failure(e), status=500))
                continue
            rows.append(_Row(req, spec, self.tokenizer))
        return rows

    def _retrieve(self, resolved: list[tuple[Request, Any]]) -> list[tuple[Request, Any]]:
        """Retrieval rows' experts, picked from their prompts (one base pass per router)."""
        groups: dict[Any, list[int]] = {}
        for i, (_, spec) in enumerate(resolved):
            if spec.retrieve is not None:
                groups.setdefault(spec.retrieve, []).append(i)
        failed = set()
        for key, idx in groups.items():
            try:
                specs = self.bank.retrieve(key, [resolved[i][0].prompt for i in idx])
            except Exception as e:  # e.g. the experts' training data is not in the home
                for i in idx:
                    _emit(resolved[i][0], Event("error", text=_failure(e), status=500))
                failed.update(idx)
                continue
            for i, spec in zip(idx, specs):
                resolved[i] = (resolved[i][0], spec)
        return [r for i, r in enumerate(resolved) if i not in failed]

    def _waiting(self, room: int) -> list[Request]:
        """Requests already queued, up to ``room`` (none while a reload is pending: the
        library is re-read between batches)."""
        taken: list[Request] = []
        while len(taken) < room and not self._reload.is_set():
            try:
                taken.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _generate(self, rows: list[_Row]) -> None:
        """Prefill ``rows``, then decode every live row one token per step.

        Continuous batching: after each step, requests waiting in the queue are
        prefilled on their own and join the running batch (their KV cache and mask
        left-padded to the batch's length, so every row still sees only its own
        tokens), up to ``max_batch`` rows. Rows that join are appended to ``rows``, so
        a failure reaches them too.
        """
        record = any(r.req.return_routing for r in rows)
        batch: Batch | None = self._prefill(list(rows), record)
        while batch is not None:
            batch = self._narrow(batch, self._step(batch.rows, batch.logits), record)
            room = self.max_batch - (len(batch.rows) if batch else 0)
            layout = self.bank.layout
            joined = self._admit(self._waiting(room)) if joinable(batch) else []
            if batch is not None and not joined and self.bank.layout != layout:
                # a refused request's preparation re-attached the experts: the running
                # rows' plan must follow the new columns
                self.bank.prepare([r.spec for r in batch.rows], record)
            if joined:
                rows += joined
                record = record or any(r.req.return_routing for r in joined)
                new = self._prefill(joined, record)
                new = self._narrow(new, self._step(new.rows, new.logits), record)
                batch = concat(batch, new)
                if batch is not None:
                    self.bank.prepare([r.spec for r in batch.rows], record)
            if batch is not None:
                batch = self._decode(batch)

    def _prefill(self, rows: list[_Row], record: bool) -> Batch:
        bank, device = self.bank, self.bank.device
        bank.prepare([r.spec for r in rows], record)
        ids, mask, positions = left_padded([r.req.prompt for r in rows], self.pad, device)
        width = ids.shape[1]
        echo = any(r.req.params.echo and r.req.params.logprobs is not None for r in rows)
        cache = new_cache(bank.model)
        out = bank.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=0 if echo else 1, **{self._cache_kw: cache},
        )  # fmt: skip
        for i, r in enumerate(rows):
            if r.req.params.echo:
                _emit(r.req, self._prompt_event(r, out.logits[i] if echo else None, width))
        return Batch(rows, cache, mask, positions[:, -1:], out.logits[:, -1].float())

    def _narrow(self, batch: Batch, keep: list[int], record: bool) -> Batch | None:
        """The rows that go on (the plan follows them); None when none does."""
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            idx = torch.tensor(keep, device=batch.mask.device)
            batch.cache.batch_select_indices(idx)
            batch = Batch([batch.rows[i] for i in keep], batch.cache, batch.mask[idx],
                           batch.positions[idx], batch.logits[idx])  # fmt: skip
            self.bank.prepare([r.spec for r in batch.rows], record)
        return batch

    def _decode(self, batch: Batch) -> Batch:
        """One step: every row's last token through the model."""
        self.bank.plan.reset_record()
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], 1)
        positions = batch.positions + 1
        step_ids = torch.tensor([r.stream.ids[-1] for r in batch.rows], device=mask.device)
        out = self.bank.model(
            input_ids=step_ids[:, None], attention_mask=mask, position_ids=positions,
            use_cache=True, **{self._cache_kw: batch.cache},
        )  # fmt: skip
        return Batch(batch.rows, batch.cache, mask, positions, out.logits[:, -1].float())

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token, report it; the indices of rows that go on."""
        routing = self.bank.plan.routing()
        chosen = next_tokens(logits, [r.req.params for r in rows], [r.generator for r in rows])
        keep = []
        for i, r in enumerate(rows):
            req, p = r.req, r.req.params
            if req.cancelled:
                r.done = True
                continue
            if p.max_tokens == 0:
                r.done = True
                _emit(req, Event("done", finish_reason="length"))
                continue
            token = int(chosen[i])
            ev = Event("token", token=token)
            if p.logprobs is not None:
                lp = logits[i].log_softmax(-1)
                ev.logprob = float(lp[token])
                ev.top = dict(zip(*top_logprobs(lp, p.logprobs)))
            if req.return_routing and routing is not None:
                ev.routing = self._top_experts(routing[i])
            r.generated += 1
            finish = None
            if token in self.eos and not p.ignore_eos:
                finish = "stop"
            else:
                ev.text = r.stream.push(token)
                if r.stream.stopped:
                    finish = "stop"
                elif r.generated >= p.max_tokens:
                    finish = "length"
            _emit(req, ev)
            if finish is None:
                keep.append(i)
            else:
                r.done = True
                _emit(req, Event("done", text=r.stream.flush(), finish_reason=finish))
        return keep

    def _top_experts(self, weights: torch.Tensor, n: int = 3) -> list[tuple[str, float]]:
        vals, idx = weights.topk(min(n, weights.numel()))
        return [
            (self.bank.expert_label(int(c)), round(float(v), 4))
            for v, c in zip(vals, idx)
            if float(v) > 0
        ]

    def _prompt_event(self, row: _Row, logits: torch.Tensor | None, width: int) -> Event:
        prompt = row.req.prompt
        ev = Event("prompt", text=self.tokenizer.decode(prompt), tokens=list(prompt))
        if logits is not None:
            k = row.req.params.logprobs or 0
            lp = logits[width - len(prompt) : -1].float().log_softmax(-1)  # predicts prompt[1:]
            target = torch.tensor(prompt[1:], device=lp.device)
            chosen = lp.gather(-1, target[:, None])[:, 0].tolist()
            ev.logprobs = [None, *chosen]
            ev.tops = [None] + [dict(zip(*top_logprobs(lp[j], k))) for j in range(len(prompt) - 1)]
        return ev


def _failure(e: Exception) -> str:
    if not isinstance(e, LorashelfError):
        log.exception("preparing a request failed")
    return str(e) if isinstance(e, LorashelfError) else f"preparing the request failed: {e}"


def _emit(req: Request, ev: Event) -> None:
    try:
        req.on_event(ev)
    except Exception:  # a broken listener must not stop the batch
        log.exception("request %d: its listener failed", req.id)
