"""Check an exported GGUF LoRA in llama.cpp itself against lorashelf's own forward.

The base GGUF is quantised (the embedded SmolLM2 is Q4_1) and llama.cpp also quantises
activations inside its matmuls, while lorashelf runs the dequantised weights in float32,
so raw log-probabilities differ between the two runtimes even without an adapter. What
the export must preserve is the *change* the adapter makes: for each prompt position and
each token among the likeliest (under either model, in lorashelf), the shift
``log p_adapter - log p_base`` is computed in both runtimes and compared (Pearson
correlation and the largest absolute difference). A wrong tensor name, orientation,
alpha or q/k permutation gives uncorrelated shifts. llama.cpp is reached through the
``llama-cpp-python`` package (``pip install llama-cpp-python``, which compiles it).

Quantised activations make that comparison noisy: any change to a layer's input re-rolls
the 8-bit rounding downstream, so even a tiny adapter moves llama.cpp's log-probs by the
runtimes' base disagreement (about 0.1 nats). :func:`dequantised_gguf` removes that
noise for an exact check: it rewrites the base GGUF with every tensor dequantised to
float32 (the very weights lorashelf runs), on which llama.cpp computes in float32 too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lorashelf.errors import LorashelfError
from lorashelf.lora import LoraFactors, attach


@dataclass(frozen=True)
class Agreement:
    """How the adapter's log-prob shifts agree between llama.cpp and lorashelf."""

    correlation: float
    max_abs_diff: float  # largest |shift_llama_cpp - shift_lorashelf| (nats)
    max_abs_shift: float  # largest |shift_lorashelf| (nats): the scale of the effect
    mean_abs_diff: float
    n: int  # (position, token) pairs compared
    greedy: dict[str, str]  # runtime -> greedy continuation of the held-out prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_llama_cpp(model_path: str, lora_path: str | None = None, n_ctx: int = 512) -> Any:
    """A ``llama_cpp.Llama`` over ``model_path`` (and the LoRA), logits for every token."""
    try:
        import llama_cpp
    except ImportError:
        raise LorashelfError(
            "checking in llama.cpp needs llama-cpp-python; pip install llama-cpp-python"
        ) from None
    kwargs: dict[str, Any] = {"lora_path": lora_path} if lora_path else {}
    return llama_cpp.Llama(
        model_path=model_path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
        n_threads=max(1, min(4, os.cpu_count() or 1)), **kwargs,
    )  # fmt: skip


def llama_cpp_logprobs(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """``[len(ids), vocab]`` next-token log-probabilities from llama.cpp."""
    llm.reset()
    llm.eval(list(ids))
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    return logits - _logsumexp(logits)


def llama_cpp_greedy(llm: Any, ids: Sequence[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    return out


def torch_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def torch_greedy(model: torch.nn.Module, ids: Sequence[int], n: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
            pad_token_id=eos,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def compare_shifts(
    ls: tuple[np.ndarray, np.ndarray], cpp: tuple[np.ndarray, np.ndarray], top_k: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """The shifts (lorashelf, llama.cpp) at the ``top_k`` likeliest tokens of each position
    under lorashelf's base or adapted model."""
    (base, ada), (cbase, cada) = ls, cpp
    vocab = min(base.shape[1], cbase.shape[1])
    rows, cols = [], []
    for pos in range(base.shape[0]):
        top = np.union1d(
            np.argsort(-base[pos, :vocab])[:top_k], np.argsort(-ada[pos, :vocab])[:top_k]
        )
        rows.extend([pos] * len(top))
        cols.extend(top.tolist())
    r, c = np.array(rows), np.array(cols)
    return ada[r, c] - base[r, c], cada[r, c] - cbase[r, c]


def verify_gguf(
    base_gguf: str,
    lora_gguf: str,
    model: torch.nn.Module,
    tokenizer: Any,
    factors: Mapping[str, LoraFactors],
    prompts: Sequence[str],
    held_out: str,
    *,
    top_k: int = 20,
    max_new_tokens: int = 24,
) -> Agreement:
    """Compare the adapter's effect in llama.cpp and in lorashelf on ``prompts``; show the
    greedy continuation of ``held_out`` with the adapter in both."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    held = tokenizer(held_out, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    base_ls = [torch_logprobs(model, ids) for ids in encoded]
    handle = attach(model, [("export", dict(factors))], weights=[1.0])
    try:
        ada_ls = [torch_logprobs(model, ids) for ids in encoded]
        greedy_ls = torch_greedy(model, held, max_new_tokens, eos)
    finally:
        handle.detach()
    llm = load_llama_cpp(base_gguf)
    base_cpp = [llama_cpp_logprobs(llm, ids) for ids in encoded]
    del llm
    llm = load_llama_cpp(base_gguf, lora_gguf)
    ada_cpp = [llama_cpp_logprobs(llm, ids) for ids in encoded]
    greedy_cpp = llama_cpp_greedy(llm, held, max_new_tokens)
    del llm
    pairs = [compare_shifts((b, a), (cb, ca), top_k) for b, a, cb, ca in
             zip(base_ls, ada_ls, base_cpp, ada_cpp)]  # fmt: skip
    s_ls = np.concatenate([p[0] for p in pairs])
    s_cpp = np.concatenate([p[1] for p in pairs])
    diff = np.abs(s_ls - s_cpp)
    return Agreement(
        correlation=float(np.corrcoef(s_ls, s_cpp)[0, 1]),
        max_abs_diff=float(diff.max()),
        max_abs_shift=float(np.abs(s_ls).max()),
        mean_abs_diff=float(diff.mean()),
        n=int(s_ls.size),
        greedy={
            "lorashelf": tokenizer.decode(greedy_ls, skip_special_tokens=True),
            "llama.cpp": tokenizer.decode(greedy_cpp, skip_special_tokens=True),
        },
    )


def dequantised_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Copy the GGUF model ``src`` to ``out`` with every tensor dequantised to float32."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(out), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub)
    writer.add_file_type(LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(n) for n in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
