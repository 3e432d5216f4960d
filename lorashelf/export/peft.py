"""PEFT output, and the rules a serving engine adds on top of a plain PEFT dir.

Every engine that serves LoRA on GPUs (vLLM, SGLang, LoRAX, Ray Serve LLM) loads a PEFT
dir, written here by the one PEFT writer (:func:`lorashelf.lora.write_peft_adapter`).
vLLM is the strictest: its ``--max-lora-rank`` takes only the ranks in
:data:`VLLM_RANKS`, it rejects DoRA and ``modules_to_save``, and it scales by one
``lora_alpha / r`` per adapter. :func:`for_vllm` makes an adapter meet those rules
without changing its update: every module is padded with zero rows of ``A`` and zero
columns of ``B`` up to one allowed rank (``B A`` is unchanged exactly), and modules
whose scale differs from the most common one get the ratio folded into ``B``, so the
config needs no ``rank_pattern`` or ``alpha_pattern``. What cannot be fixed without
changing the update (a rank above 512) is refused with the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorashelf.errors import LorashelfError
from lorashelf.lora import LoraFactors

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TARGETS = ("vllm",)


@dataclass(frozen=True)
class Fixed:
    """An adapter brought to one rank and one scale, and what was changed to get there."""

    factors: dict[str, LoraFactors]
    rank: int
    changes: list[str]


def one_rank(factors: Mapping[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """Every module zero-padded to ``rank`` with one common scale (updates unchanged)."""
    scale = Counter(f.scale for f in factors.values()).most_common(1)[0][0]
    out = {}
    for module, f in factors.items():
        if f.rank > rank:
            raise ValueError(f"{module} has rank {f.rank} > {rank}")
        A, B = f.A.float(), f.B.float() * (f.scale / scale)
        pad = rank - f.rank
        out[module] = LoraFactors(
            A=torch.cat([A, A.new_zeros(pad, A.shape[1])]),
            B=torch.cat([B, B.new_zeros(B.shape[0], pad)], 1),
            scale=scale,
        )
    return out


def for_vllm(factors: Mapping[str, LoraFactors]) -> Fixed:
    """``factors`` as an adapter vLLM loads unchanged (see the module doc)."""
    top = max(f.rank for f in factors.values())
    allowed = [r for r in VLLM_RANKS if r >= top]
    if not allowed:
        raise LorashelfError(
            f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); pass "
            f"--rank {VLLM_RANKS[-1]} (or lower) to cut it by SVD"
        )
    rank = allowed[0]
    changes = []
    ranks = sorted({f.rank for f in factors.values()})
    if ranks != [rank]:
        changes.append(
            f"rank {'/'.join(map(str, ranks))} padded with zeros to {rank} (vLLM ranks: "
            f"{', '.join(map(str, VLLM_RANKS))}); the update is unchanged"
        )
    if len({f.scale for f in factors.values()}) > 1:
        changes.append("per-module scales folded into lora_B (vLLM reads one lora_alpha)")
    return Fixed(one_rank(factors, rank), rank, changes)


def check_target(target: str | None) -> None:
    if target is not None and target not in TARGETS:
        raise LorashelfError(f"unknown --target {target!r}; known: {', '.join(TARGETS)}")


def vllm_problems(config: Mapping[str, Any]) -> list[str]:
    """What in an ``adapter_config.json`` vLLM's loader would reject (empty: none)."""
    problems = []
    if config.get("r") not in VLLM_RANKS:
        problems.append(f"rank {config.get('r')} is not one of {VLLM_RANKS}")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                      ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):  # fmt: skip
        if config.get(key):
            problems.append(f"it uses {what}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} needs vLLM's --enable-lora-bias")
    return problems
