"""The engine: a request's greedy tokens are the same alone or in a mixed batch, and
equal what eval's own methods generate with transformers' ``generate``."""

from __future__ import annotations

import copy

import pytest
import torch

from lorashelf.methods import MethodContext, prepare
from lorashelf.serve.compositions import Composition as C
from lorashelf.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8)
PROMPTS = ["Q: what is two plus two?\nA:", "hello", "The library of experts says"]
COMPS = [
    C("lib"),
    C("lib", "expert", ("alpha",)),
    C("lib", "expert", ("beta",)),
    C("lib", "weights", ("alpha", "gamma"), (0.7, 0.3)),
    C("lib", "uniform"),
    C("lib", "ties"),
    C("lib", "arrow", top_k=2),
    C("lib", "arrow", ("beta", "gamma"), top_k=1),
]


def jobs():
    return [(PROMPTS[i % len(PROMPTS)], c, GREEDY) for i, c in enumerate(COMPS)]


def test_batched_equals_solo(served, serve_kit):
    batched = serve_kit.complete(served.engine, jobs())
    for job, events in zip(jobs(), batched):
        (solo,) = serve_kit.complete(served.engine, [job])
        assert serve_kit.tokens(events) == serve_kit.tokens(solo), job[1]
        assert events[-1].kind == "done" and events[-1].finish_reason == "length"
    # the compositions really differ (else the test above could not fail)
    on_first = serve_kit.complete(served.engine, [(PROMPTS[0], c, GREEDY) for c in COMPS])
    assert len({tuple(serve_kit.tokens(e)) for e in on_first}) >= 4  # tiny random model: some tie


def _hf_greedy(model, tokenizer, prompt, n):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()


def _served_methods():
    from lorashelf.serve.compositions import merge_kinds

    return ["base", "expert:beta", *merge_kinds(), "arrow"]  # every registered merge


@pytest.mark.parametrize("method", _served_methods())
def test_matches_eval_methods(served, serve_kit, tiny_model, tiny_tokenizer, method):
    """Independent reference: eval's prepare() on a fresh model + transformers' generate."""
    from lorashelf.serve.compositions import parse_method

    comp = parse_method("lib", method)
    params = SamplingParams(max_tokens=6)
    prompts = PROMPTS[:2]
    ours = serve_kit.complete(served.engine, [(p, comp, params) for p in prompts])
    ref_model = copy.deepcopy(tiny_model)
    prepared = prepare(method, ref_model, MethodContext(served.library), {"top_k": 4})
    try:
        for p, events in zip(prompts, ours):
            ref = _hf_greedy(prepared.model, tiny_tokenizer, p, 6)
            assert serve_kit.tokens(events) == ref
    finally:
        prepared.close()


def test_routing_is_reported_per_token(served, serve_kit):
    comp = C("lib", "arrow", top_k=2)
    (events,) = serve_kit.complete(served.engine, [(PROMPTS[0], comp, GREEDY)], return_routing=True)
    toks = [e for e in events if e.kind == "token"]
    assert len(toks) == 8
    for e in toks:
        names = [n for n, _ in e.routing]
        assert set(names) <= {"lib/alpha", "lib/beta", "lib/gamma"}
        assert 0.99 < sum(w for _, w in e.routing) < 1.01  # 3 experts: all of the mass
    (fixed,) = serve_kit.complete(
        served.engine, [(PROMPTS[0], C("lib", "expert", ("gamma",)), GREEDY)], return_routing=True
    )
    assert all(e.routing == [("lib/gamma", 1.0)] for e in fixed if e.kind == "token")


def test_echo_logprobs_match_the_model(served, serve_kit, tiny_model, tiny_tokenizer):
    params = SamplingParams(max_tokens=1, echo=True, logprobs=2)
    (events,) = serve_kit.complete(served.engine, [("hello world", C("lib"), params)])
    prompt = events[0]
    assert prompt.kind == "prompt" and prompt.logprobs[0] is None
    ids = torch.tensor([prompt.tokens])
    with torch.no_grad():
        lp = tiny_model(ids).logits[0].log_softmax(-1)
    want = lp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(torch.tensor(prompt.logprobs[1:]), want, atol=1e-5)
    assert len(prompt.tops[1]) == 2 and max(prompt.tops[1].values()) == pytest.approx(
        float(lp[0].max()), abs=1e-5
    )


def test_stop_sequence_and_budget(served, serve_kit):
    (free,) = serve_kit.complete(
        served.engine, [(PROMPTS[1], C("lib"), SamplingParams(max_tokens=12))]
    )
    full = serve_kit.text(free)
    stop = full[3:5]
    (cut,) = serve_kit.complete(
        served.engine, [(PROMPTS[1], C("lib"), SamplingParams(max_tokens=12, stop=(stop,)))]
    )
    assert serve_kit.text(cut) == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_in_any_batch(served, serve_kit):
    hot = SamplingParams(max_tokens=8, temperature=1.5, top_p=0.9, seed=11)
    (alone,) = serve_kit.complete(served.engine, [(PROMPTS[0], C("lib"), hot)])
    together = serve_kit.complete(
        served.engine, [(PROMPTS[1], C("lib"), GREEDY), (PROMPTS[0], C("lib"), hot)]
    )
    assert serve_kit.tokens(together[1]) == serve_kit.tokens(alone)


def test_unknown_expert_is_an_error_event(served, serve_kit):
    (events,) = serve_kit.complete(
        served.engine, [(PROMPTS[0], C("lib", "expert", ("alpah",)), GREEDY)]
    )
    assert events == [events[0]] and events[0].kind == "error" and events[0].status == 404


def _queued(engine, tokenizer, jobs, events):
    from lorashelf.serve.engine import Request

    for i, (text, comp, params) in enumerate(jobs):
        engine.queue.put_nowait(
            Request(tokenizer(text)["input_ids"], comp, params, events[i].append)
        )


@pytest.mark.parametrize("max_batch", [8, 3])
def test_waiting_requests_join_a_running_batch(served, serve_kit, max_batch):
    """Continuous batching: requests queued while a batch runs join it between steps
    (their caches left-padded to the batch's length) and still get their solo tokens."""
    engine = served.engine
    engine.max_batch = max_batch
    long_prompt = "a long prompt that makes the first cache wider than the others " * 2
    first = (long_prompt, COMPS[6], SamplingParams(max_tokens=3))
    later = [
        (PROMPTS[i % len(PROMPTS)], c, SamplingParams(max_tokens=2 + i % 4))
        for i, c in enumerate(COMPS)
    ]
    events = [[] for _ in later]
    _queued(engine, served.tokenizer, later, events)
    (head,) = serve_kit.complete(engine, [first])
    assert engine.queue.empty()  # every queued request ran inside that one run_batch
    (solo_head,) = serve_kit.complete(engine, [first])
    assert serve_kit.tokens(head) == serve_kit.tokens(solo_head)
    for job, got in zip(later, events):
        (solo,) = serve_kit.complete(engine, [job])
        assert serve_kit.tokens(got) == serve_kit.tokens(solo), job[1]
        assert len(serve_kit.tokens(got)) == job[2].max_tokens
        assert got[-1].kind == "done"


def test_a_refused_joiner_that_reattached_leaves_the_batch_intact(served, serve_kit,
                                                                  monkeypatch):  # fmt: skip
    """A queued GenKnowSub request attaches its rewritten experts, then fails (its
    routers do not build): the running rows go on with their solo tokens."""
    from lorashelf.errors import LorashelfError
    from lorashelf.serve.compositions import with_options

    engine, bank = served.engine, served.bank
    running = [(PROMPTS[0], C("lib", "uniform"), SamplingParams(max_tokens=4)),
               (PROMPTS[1], C("lib", "expert", ("beta",)), SamplingParams(max_tokens=4))]  # fmt: skip
    solo = [serve_kit.tokens(serve_kit.complete(engine, [job])[0]) for job in running]
    build = bank._build_routers

    def failing(key):
        if dict(key[-1]).get("gks"):
            raise LorashelfError("no routers today")
        return build(key)

    monkeypatch.setattr(bank, "_build_routers", failing)
    gks = with_options(C("lib", "arrow"), {"settings": {"gks": "delta", "gks_experts": "gamma"}})
    events = [[]]
    _queued(engine, served.tokenizer, [(PROMPTS[2], gks, GREEDY)], events)
    layout = bank.layout
    got = serve_kit.complete(engine, running)
    assert bank.layout > layout  # the refused request did re-attach
    assert events[0][-1].kind == "error" and "no routers today" in events[0][-1].text
    assert [serve_kit.tokens(e) for e in got] == solo


def test_no_request_joins_while_a_reload_waits(served, serve_kit):
    engine = served.engine
    events = [[]]
    _queued(engine, served.tokenizer, [(PROMPTS[1], COMPS[1], GREEDY)], events)
    engine._reload.set()
    serve_kit.complete(engine, [(PROMPTS[0], COMPS[0], SamplingParams(max_tokens=3))])
    assert engine.queue.qsize() == 1 and events == [[]]
    engine._reload.clear()


def test_ignore_eos_goes_on_past_end_of_sequence(served, serve_kit):
    from lorashelf.serve.protocol import ParamError, parse

    engine = served.engine
    job = (PROMPTS[0], COMPS[1], SamplingParams(max_tokens=4))
    (free,) = serve_kit.complete(engine, [job])
    engine.eos = {serve_kit.tokens(free)[0]}  # the first greedy token now ends the answer
    (stopped,) = serve_kit.complete(engine, [job])
    assert len(serve_kit.tokens(stopped)) == 1 and stopped[-1].finish_reason == "stop"
    body = {"model": "lib", "prompt": "x", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    params = parse(body, "completion", served.tokenizer).params
    assert params.ignore_eos
    (going,) = serve_kit.complete(engine, [(PROMPTS[0], COMPS[1], params)])
    assert serve_kit.tokens(going) == serve_kit.tokens(free)
    with pytest.raises(ParamError):
        parse({"model": "lib", "prompt": "x", "ignore_eos": "yes"}, "completion", served.tokenizer)


def test_fp32_lora_on_a_bf16_model_matches_peft(tiny_library, tiny_model, tiny_tokenizer):
    """``--lora-dtype fp32``: the LoRA branch in float32 on a bf16 base, as PEFT loads
    adapters (autocast_adapter_dtype); the prompt logits equal PEFT's, the default
    (bf16 branch) ones do not match as closely."""
    from peft import PeftModel

    from lorashelf.serve.bank import Bank
    from lorashelf.serve.engine import Engine

    lib = tiny_library({"alpha": ["task:a"], "beta": ["task:b"]})
    params = SamplingParams(max_tokens=1, echo=True, logprobs=0)
    ids = tiny_tokenizer(PROMPTS[2])["input_ids"]
    peft = PeftModel.from_pretrained(
        copy.deepcopy(tiny_model).bfloat16(), str(lib.get("beta").path)
    )
    assert next(p for n, p in peft.named_parameters() if "lora_A" in n).dtype == torch.float32
    with torch.no_grad():
        ref = peft(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    ref = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    gaps = {}
    for lora_dtype in (torch.float32, None):
        bank = Bank(copy.deepcopy(tiny_model).bfloat16(), {"lib": lib}, lora_dtype=lora_dtype)
        engine = Engine(bank, tiny_tokenizer)
        events = []
        from lorashelf.serve.engine import Request

        engine.run_batch([Request(ids, C("lib", "expert", ("beta",)), params, events.append)])
        bank.close()
        got = torch.tensor(events[0].logprobs[1:])
        gaps[lora_dtype] = float((got - ref).abs().max())
    assert gaps[torch.float32] < 1e-4
    assert gaps[None] > gaps[torch.float32]


@pytest.mark.parametrize("method,settings", [("dare-ties", {"density": 0.7, "dare_seed": 3}),
                                             ("core-space", {"core_merge": "task-arithmetic"})])  # fmt: skip
def test_merge_settings_match_eval_set(served, serve_kit, tiny_model, tiny_tokenizer, method,
                                       settings):  # fmt: skip
    """A request's ``lorashelf.settings`` are the merge's options, as ``eval --set``."""
    from lorashelf.serve.compositions import parse_method, with_options

    comp = with_options(parse_method("lib", method), {"settings": settings})
    (ours,) = serve_kit.complete(served.engine, [(PROMPTS[0], comp, SamplingParams(max_tokens=6))])
    (default,) = serve_kit.complete(served.engine, [(PROMPTS[0], parse_method("lib", method),
                                                     SamplingParams(max_tokens=6))])  # fmt: skip
    prepared = prepare(method, copy.deepcopy(tiny_model), MethodContext(served.library), settings)
    try:
        assert serve_kit.tokens(ours) == _hf_greedy(prepared.model, tiny_tokenizer, PROMPTS[0], 6)
    finally:
        prepared.close()
    assert serve_kit.tokens(ours) != serve_kit.tokens(default) or method == "core-space"


def test_bad_settings_are_refused(served, serve_kit):
    from lorashelf.serve.compositions import parse_method, with_options

    def run(method, settings):
        comp = with_options(parse_method("lib", method), {"settings": settings})
        (events,) = serve_kit.complete(served.engine, [(PROMPTS[0], comp, GREEDY)])
        return events[-1]

    bad = run("ties", {"densty": 0.5})
    assert bad.kind == "error" and bad.status == 400 and "did you mean: density" in bad.text
    params = run("arrow", {"mix": "params"})  # the server mixes outputs only
    assert params.kind == "error" and params.status == 400 and "mix='params'" in params.text
    gks = run("arrow", {"gks": "delta"})  # no general experts named
    assert gks.kind == "error" and gks.status == 400 and "gks_experts" in gks.text
    assert run("arrow", {"top_k": 1}).kind == "done"


def _eval_greedy(method, library, model, tokenizer, settings, prompts, n=6):
    prepared = prepare(method, copy.deepcopy(model), MethodContext(library, tokenizer=tokenizer),
                       settings)  # fmt: skip
    try:
        return [_hf_greedy(prepared.model, tokenizer, p, n) for p in prompts]
    finally:
        prepared.close()


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_k": 2, "weighting": "softmax"},
                                      {"top_k": 2, "then_arrow": True}])  # fmt: skip
def test_retrieval_matches_eval(served, serve_kit, tiny_model, tiny_tokenizer, kit, settings):
    """Served retrieval picks each request's experts from its own prompt, in a mixed
    batch, and generates what eval's retrieval router (hooks on the model) generates."""
    from lorashelf.serve.compositions import parse_method, with_options
    from lorashelf.serve.retrieval import embed_prompts

    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    # expert i's embedding is prompt i's (names sort as alpha, beta, gamma)
    kit.add_random_retrieval_embeddings(served.library, tiny_model,
                                        vectors=list(embed_prompts(served.bank, prompts)))  # fmt: skip
    comp = with_options(parse_method("lib", "retrieval"), {"settings": settings})
    params = SamplingParams(max_tokens=6)
    others = [(PROMPTS[0], C("lib", "expert", ("beta",)), params), (PROMPTS[1], C("lib"), params)]
    ours = serve_kit.complete(served.engine, [(p, comp, params) for p in PROMPTS] + others)
    ref = _eval_greedy("retrieval", served.library, tiny_model, tiny_tokenizer, settings, PROMPTS)
    assert [serve_kit.tokens(e) for e in ours[: len(PROMPTS)]] == ref
    # the prompts pick different experts (else a per-library choice would pass too)
    key = served.bank.resolve(comp).retrieve
    picked = {spec.fixed or spec.routed for spec in served.bank.retrieve(key, prompts)}
    assert len(picked) > 1


@pytest.mark.parametrize("variant", ["delta", "peft"])
def test_genknowsub_matches_eval(served, serve_kit, tiny_model, tiny_tokenizer, variant):
    """Arrow with GenKnowSub: the rewritten experts are served as virtual experts, and
    the tokens equal eval's; the general expert itself is never routed to."""
    from lorashelf.serve.compositions import parse_method, with_options

    settings = {"gks": variant, "gks_experts": "gamma", "top_k": 1}
    comp = with_options(parse_method("lib", "arrow"), {"settings": settings})
    params = SamplingParams(max_tokens=6)
    jobs = [(p, comp, params) for p in PROMPTS[:2]] + [(PROMPTS[2], C("lib", "uniform"), params)]
    ours = serve_kit.complete(served.engine, jobs, return_routing=True)
    ref = _eval_greedy("arrow", served.library, tiny_model, tiny_tokenizer, settings, PROMPTS[:2])
    assert [serve_kit.tokens(e) for e in ours[:2]] == ref
    routed = {n for e in ours[0] + ours[1] if e.kind == "token" for n, _ in e.routing}
    assert routed and all(n.startswith("lib:arrow{") and "gks=" in n for n in routed), routed
    assert not any(n.endswith("/gamma") for n in routed)
