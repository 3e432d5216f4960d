"""Encoding, batching and the target-only loss against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorashelf.data.task import Example
from lorashelf.train.batches import (
    Encoded,
    batch_order,
    bucket_lengths,
    collate,
    encode,
    encode_examples,
)
from lorashelf.train.config import TrainConfig, parse_targets
from lorashelf.train.loss import target_nll
from lorashelf.train.trainer import lr_factor


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_appends_eos_and_counts_target(tiny_tokenizer):
    e = encode(tiny_tokenizer, "Q: 2+2?", " four", max_length=64)
    target = ids_of(tiny_tokenizer, " four") + [tiny_tokenizer.eos_token_id]
    assert list(e.ids) == ids_of(tiny_tokenizer, "Q: 2+2?") + target
    assert e.n_target == len(target)


def test_left_truncation_keeps_target(tiny_tokenizer):
    prompt = "a long preamble that will not fit " * 4 + "END:"
    e = encode(tiny_tokenizer, prompt, " yes", max_length=16)
    target = ids_of(tiny_tokenizer, " yes") + [tiny_tokenizer.eos_token_id]
    assert len(e.ids) == 16
    assert list(e.ids[-e.n_target :]) == target
    assert list(e.ids[: 16 - len(target)]) == ids_of(tiny_tokenizer, prompt)[-(16 - len(target)) :]
    # a target longer than the window keeps its start and one prompt token
    long = encode(tiny_tokenizer, "P:", " " + "x" * 40, max_length=8)
    assert len(long.ids) == 8 and long.n_target == 7


def test_empty_prompt_gets_a_start_token(tiny_tokenizer):
    e = encode(tiny_tokenizer, "", " yes", max_length=16)
    assert e.ids[0] in (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    assert e.n_target == len(e.ids) - 1


def test_batch_order_is_seeded_epochs_cover_everything():
    lengths = [5, 50, 7, 30, 8, 9, 41, 3, 22, 13]
    it = batch_order(lengths, 3, seed=0)
    epoch = [next(it) for _ in range(4)]  # 10 examples in batches of 3 -> 4 batches
    assert sorted(i for b in epoch for i in b) == list(range(10))
    again = batch_order(lengths, 3, seed=0)
    assert [next(again) for _ in range(8)] == epoch + [next(it) for _ in range(4)]
    other = batch_order(lengths, 3, seed=1)
    assert [next(other) for _ in range(4)] != epoch
    # bucketing: batches are runs of the length-sorted window
    flat = sorted(lengths)
    for b in epoch:
        ls = sorted(lengths[i] for i in b)
        start = flat.index(ls[0])
        assert ls == flat[start : start + len(ls)]


def test_buckets_do_not_group_examples_by_answer():
    # one prompt length, answers of 2 and 4 tokens (with EOS): sorting a window by total
    # length makes every batch one answer; the bucket key is the prompt's length only
    encoded = [Encoded(ids=(7,) * 20 + (1,) * (2 if i % 2 else 4), n_target=2 if i % 2 else 4)
               for i in range(64)]  # fmt: skip
    assert bucket_lengths(encoded) == [20] * 64
    order = batch_order(bucket_lengths(encoded), 8, seed=0)
    mixed = [
        b for b in (next(order) for _ in range(8)) if len({encoded[i].n_target for i in b}) == 2
    ]
    assert len(mixed) >= 6
    by_total = batch_order([len(e.ids) for e in encoded], 8, seed=0)
    assert all(len({encoded[i].n_target for i in next(by_total)}) == 1 for _ in range(8))


def test_collate_marks_prediction_positions(tiny_tokenizer):
    enc = encode_examples(
        tiny_tokenizer,
        [Example("abc", " d"), Example("longer prompt", " xy")],
        max_length=64,
    )
    b = collate(enc, pad_id=0, device=torch.device("cpu"))
    assert b.attention_mask is not None and b.input_ids.shape[1] == max(len(e.ids) for e in enc)
    assert torch.equal(b.input_ids[b.rows, b.cols + 1], b.labels)
    assert len(b.labels) == sum(e.n_target for e in enc)
    same = collate([enc[0], enc[0]], pad_id=0, device=torch.device("cpu"))
    assert same.attention_mask is None  # nothing padded: let attention take its fast path


def test_target_nll_equals_masked_full_logits(tiny_model, tiny_tokenizer):
    examples = [
        Example("The cat sat on the", " mat"),
        Example("Two plus two is", " four"),
        Example("x", " a much longer target here"),
    ]
    enc = encode_examples(tiny_tokenizer, examples, max_length=64)
    batch = collate(enc, pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"))
    with torch.no_grad():
        ours = target_nll(tiny_model, batch)
        # independent: full logits, labels -100 except target tokens (+EOS), shifted CE
        total = 0.0
        for ex in examples:
            p = ids_of(tiny_tokenizer, ex.prompt)
            t = ids_of(tiny_tokenizer, ex.target) + [tiny_tokenizer.eos_token_id]
            ids = torch.tensor([p + t])
            labels = torch.tensor([[-100] * len(p) + t])
            logits = tiny_model(ids).logits[0, :-1]
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
    assert ours.item() == pytest.approx(total.item(), rel=1e-5)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] > 0 and f[9] < f[10] == 1.0 and f[-1] < 0.05
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    cos = TrainConfig(steps=100, warmup=0.0, schedule="cosine")
    assert lr_factor(50, 100, cos) == pytest.approx(0.5)
    const = TrainConfig(steps=100, warmup=0.0, schedule="constant")
    assert lr_factor(99, 100, const) == 1.0


def test_config_checks_and_card():
    from lorashelf.config import from_dict
    from lorashelf.errors import LorashelfError

    assert TrainConfig().lora_alpha == 8.0 and TrainConfig(rank=16).lora_alpha == 32.0
    assert TrainConfig(alpha=4).lora_alpha == 4.0
    card = TrainConfig(rank=8).to_card()
    assert card["alpha"] == 16.0 and card["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    assert from_dict(TrainConfig, card) == TrainConfig(rank=8, alpha=16.0)
    assert TrainConfig(target_modules=("all-linear",)).peft_targets == "all-linear"
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    for bad in [dict(rank=0), dict(steps=None), dict(epochs=1.0), dict(schedule="step")]:
        with pytest.raises(LorashelfError):
            TrainConfig(**bad)
    assert TrainConfig(steps=None, epochs=2.0).total_steps(9) == 3  # ceil(2 * 9 / 8)


def test_autocast_choice():
    from lorashelf.train.trainer import compute_dtype

    cpu = torch.device("cpu")
    assert compute_dtype(TrainConfig(), cpu, torch.bfloat16) == torch.float32  # no autocast
    assert compute_dtype(TrainConfig(), cpu, torch.float32) == torch.bfloat16
    assert compute_dtype(TrainConfig(dtype="fp32"), cpu, torch.float32) == torch.float32
    assert compute_dtype(TrainConfig(dtype="bf16"), cpu, torch.bfloat16) == torch.bfloat16
