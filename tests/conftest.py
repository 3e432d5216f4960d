"""Shared test fixtures: a tiny random Llama and a byte-level tokenizer, built in
the test session (no download). Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: every byte is one token; exact round trip."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_model(vocab_size: int, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Session-scoped: tests must not modify it (copy.deepcopy if you need to)."""
    return make_model(len(tiny_tokenizer))


# ---- integration (slow) helpers: the real model and real BIG-bench in the user cache
@pytest.fixture(scope="session")
def real_home():
    """The real cache root (``$LORASHELF_HOME`` or ~/.cache/lorashelf), with the
    embedded SmolLM2 converted through the project's own command."""
    from lorashelf.cli import default_home, main

    home = default_home()
    if not (home / "models" / "smollm2-135m" / "config.json").exists():
        assert main(["--home", str(home), "model", "pull"]) == 0
    return home


@pytest.fixture(scope="session")
def ensure_bigbench(real_home):
    """``ensure_bigbench(names)``: pull those BIG-bench tasks into the real cache with
    ``lorashelf data pull`` unless present."""
    from lorashelf.cli import main

    def ensure(names: list[str]) -> None:
        root = real_home / "data" / "bigbench" / "benchmark_tasks"
        missing = [n for n in names if not (root / n / "task.json").exists()]
        if missing:
            argv = ["--home", str(real_home), "data", "pull", "bigbench", "--only", *missing]
            assert main(argv) == 0

    return ensure
