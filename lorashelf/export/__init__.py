"""Hand a static composition to the runtimes people deploy with.

A method that reduces to one LoRA (an expert, a uniform or TIES merge, an explicit
weighting; :mod:`lorashelf.export.resolve`) is written as a standard PEFT dir that vLLM,
SGLang, LoRAX and PEFT load (``--target vllm`` also meets vLLM's rank rules:
:mod:`lorashelf.export.peft`), or as a llama.cpp LoRA adapter GGUF that llama.cpp, its
server, Ollama and LM Studio load next to the base GGUF (:mod:`lorashelf.export.gguf`).
Routed methods have no static form; ``lorashelf serve`` is their runtime.

    exported = export_adapter(lib, "ties", "gguf", "ties.gguf", rank=16)
"""

from __future__ import annotations

from lorashelf.export.gguf import GgufBase, read_base, write_gguf_lora
from lorashelf.export.peft import VLLM_RANKS, for_vllm
from lorashelf.export.resolve import Resolved, resolve
from lorashelf.export.run import FORMATS, Exported, export_adapter

__all__ = [
    "FORMATS",
    "VLLM_RANKS",
    "Exported",
    "GgufBase",
    "Resolved",
    "export_adapter",
    "for_vllm",
    "read_base",
    "resolve",
    "write_gguf_lora",
]
