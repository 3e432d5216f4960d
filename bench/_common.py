"""Shared helpers for benchmarks: machine description, JSON output, and the models and
devices every speed benchmark runs on (``--device``, ``--model``).

Speed does not depend on the weights' values, so a benchmark can run on a randomly
initialised model of a published configuration with no download: ``random:NAME``
builds the ``LlamaConfig`` of :data:`RANDOM_CONFIGS` in code (``smollm2-135m``: the
shapes of HuggingFaceTB/SmolLM2-135M; ``llama-1b``: a 1B-class Llama, the shapes of
Llama-3.2-1B; ``tiny``: a 2-layer model for the CPU smoke run). Its tokenizer is the
embedded SmolLM2 tokenizer when its converted copy is cached under the lorashelf home,
else a byte-level tokenizer built in code (256 byte tokens and 3 specials). Any other
``--model`` value is loaded by ``lorashelf.models.load_base`` as before. Tasks named
``synthetic`` are built in code too (:func:`synthetic_task`), so nothing is read from
the network or a data cache.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# published shapes; everything else is LlamaConfig's default
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}  # fmt: skip
DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    env = os.environ.get("LORASHELF_HOME")
    return Path(env) if env else Path.home() / ".cache" / "lorashelf"


def add_model_args(ap: Any, model: str = DEFAULT_MODEL) -> None:
    """``--device`` and ``--model`` on a benchmark's argument parser."""
    ap.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1"
    )
    ap.add_argument(
        "--model", default=model,
        help=f"a local model (default {model}) or random:CONFIG, CONFIG one of "
        f"{', '.join(RANDOM_CONFIGS)} (random weights, no download)",
    )  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    return device


def model_config(spec: str) -> dict[str, Any]:
    """The shapes of ``random:NAME`` (or of the real SmolLM2, which shares them)."""
    name = spec.removeprefix("random:")
    if name not in RANDOM_CONFIGS:
        raise SystemExit(f"unknown model config {name!r}; use one of {', '.join(RANDOM_CONFIGS)}")
    return RANDOM_CONFIGS[name]


def load_model(spec: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A ``lorashelf.models.BaseModel`` for ``--model``, its weights on ``device``."""
    from lorashelf.models import BaseModel, load_base

    if not spec.startswith("random:"):
        base = load_base(spec, home=home(), dtype=dtype)
        base.model.to(device)
        return base
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_config(spec))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    tok = random_model_tokenizer()
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return BaseModel(model=model, tokenizer=tok, name=spec, base_id=spec, path="(random init)")


def random_model_tokenizer():
    """The SmolLM2 tokenizer if its converted copy is cached here, else a byte-level one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cached = home() / "models" / "smollm2-135m"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], pad_token=specials[0],
        unk_token=specials[0],
    )  # fmt: skip


SPORTS = ["basketball", "hockey", "soccer", "tennis", "baseball", "golf", "cricket"]
ACTS = ["scored a touchdown", "hit a home run", "made a three pointer", "served an ace",
        "sank a putt", "took a penalty kick", "bowled a yorker", "shot a slapshot"]  # fmt: skip
NAMES = ["Jamal", "Marta", "Kenji", "Ola", "Priya", "Tomas", "Lena", "Diego", "Sven", "Aisha"]


def synthetic_task(n: int = 400, seed: int = 0):
    """A multiple-choice task built in code (plausible/implausible sports sentences, as
    BIG-bench sports_understanding), for runs that must not read a data cache."""
    from lorashelf.data.task import Example, Task

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        who, act, sport = rng.choice(NAMES), rng.choice(ACTS), rng.choice(SPORTS)
        answer = rng.randrange(2)
        examples.append(
            Example(
                prompt=f'Is the following sentence plausible? "{who} {act} in the {sport} '
                f'match number {i}."\nAnswer:',
                target=("plausible", "implausible")[answer],
                options=("plausible", "implausible"),
                answer=answer,
            )
        )
    return Task(id="synthetic", examples=tuple(examples), kind="mc")


def load_bench_task(task_id: str):
    """``synthetic`` (built in code) or any task id lorashelf can load from its home."""
    if task_id == "synthetic":
        return synthetic_task()
    from lorashelf.data import load_task

    return load_task(task_id, home=home())


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall clock times it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (
                platform.processor() or platform.machine()
            ):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # bf16 speed, and so most ratios here, depends on these more than on the model name
    units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))
             if flag in flags]  # fmt: skip
    return {
        "cpu": f"{cpu} ({', '.join(units) or 'no bf16 matrix units'})",
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def write_json(path: str | None, payload: dict) -> None:
    if path:
        payload = {**payload, "machine": machine()}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
