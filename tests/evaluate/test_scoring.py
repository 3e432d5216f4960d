"""Scoring equals an independent, unbatched computation."""

from __future__ import annotations

import pytest
import torch

from lorashelf.evaluate.metrics import exact_match, mc_correct, normalize_answer
from lorashelf.evaluate.scoring import Scored, encode_pair, score_continuations

PAIRS = [
    ("Q: is the sky blue?\nA:", " yes"),
    ("Q: is the sky blue?\nA:", " no"),
    ("Q: 2+2?\nA:", " four, definitely"),
    ("A longer prompt with more words in it to force padding\nA:", " x"),
    ("short", " a much longer continuation than the prompt"),
]


def reference_logprob(model, tokenizer, prompt: str, cont: str) -> float:
    """One sequence, no padding, full logits, plain loop over continuation tokens."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(c))


@pytest.mark.parametrize("mode", ["shared", "fast", "plain"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_equal_one_at_a_time(tiny_model, tiny_tokenizer, mode, batch_size):
    kw = {"shared": {}, "fast": {"share_prompt": False}, "plain": {"fast": False}}[mode]
    got = score_continuations(tiny_model, tiny_tokenizer, PAIRS, batch_size=batch_size, **kw)
    for (p, c), s in zip(PAIRS, got, strict=True):
        assert s.n_tokens == len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"])
        assert s.logprob == pytest.approx(
            reference_logprob(tiny_model, tiny_tokenizer, p, c), abs=1e-4
        )


def test_fast_path_matches_plain_in_bf16(tiny_model, tiny_tokenizer):
    import copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    fast = score_continuations(model, tiny_tokenizer, PAIRS, fast=True)
    plain = score_continuations(model, tiny_tokenizer, PAIRS, fast=False)
    for a, b in zip(fast, plain, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=0.05 * max(1, abs(b.logprob)))


def test_peft_wrapped_model_scores_with_lora_active(tiny_model, tiny_tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    got = score_continuations(peft_model, tiny_tokenizer, PAIRS[:2])
    base = score_continuations(tiny_model, tiny_tokenizer, PAIRS[:2])
    ref = reference_logprob(peft_model, tiny_tokenizer, *PAIRS[0])
    assert got[0].logprob == pytest.approx(ref, abs=1e-4)
    assert got[0].logprob != pytest.approx(base[0].logprob, abs=1e-4)


def test_left_truncation_keeps_the_continuation(tiny_tokenizer):
    ids, n = encode_pair(tiny_tokenizer, "x" * 50, " answer", max_length=12)
    assert len(ids) == 12
    assert n == len(" answer")
    assert tiny_tokenizer.decode(ids[-n:]) == " answer"


def test_metrics():
    assert normalize_answer("The  Answer!") == "answer"
    assert exact_match("an apple.", ["Apple"])
    assert not exact_match("pear", ["apple", "banana"])
    scores = [Scored(-3.0, 1), Scored(-1.0, 1), Scored(-1.0, 2)]
    assert not mc_correct(scores, 1)  # tie is not a win
    assert mc_correct([Scored(-3.0, 1), Scored(-1.0, 1)], 1)
    assert not mc_correct([Scored(-3.0, 1), Scored(-1.0, 1)], 0)
    # several options share the top credit (BIG-bench target_scores): any of them counts
    three = [Scored(-2.0, 1), Scored(-1.0, 1), Scored(-5.0, 1)]
    assert mc_correct(three, 0, credits=(1.0, 1.0, 0.0))
    assert not mc_correct(three, 1, credits=(1.0, 0.0, 1.0))


def test_greedy_generate_matches_manual_loop(tiny_model, tiny_tokenizer):
    from lorashelf.evaluate.generate import greedy_generate

    prompts = ["Q: hello\nA:", "a much longer prompt so rows need left padding\nA:"]
    got = greedy_generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=2)
    for prompt, text in zip(prompts, got, strict=True):
        ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = tiny_model(ids).logits[0, -1].argmax()
                if int(nxt) == tiny_tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        full = tiny_tokenizer.decode(
            ids[0, len(tiny_tokenizer(prompt)["input_ids"]) :], skip_special_tokens=True
        )
        assert text == full.split("\n", 1)[0].strip()
