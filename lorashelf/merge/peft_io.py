"""Write a :class:`Merged` as a standard PEFT LoRA adapter, so a merge joins the library.

The directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by
``PeftModel.from_pretrained``) and ``merge.json`` with the method, its config and the
truncation error. Low-rank results are written as they are (exact). Dense results, and
low-rank ones above the requested rank, are truncated to ``rank`` by SVD, the best
rank-k approximation in Frobenius norm (Eckart-Young); for a factored delta the SVD
runs on the small r x r core after QR of both factors, never on a dense matrix.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor

from lorashelf.config import to_dict, write_json_atomic
from lorashelf.errors import LorashelfError
from lorashelf.merge.base import LowRank

if TYPE_CHECKING:
    from lorashelf.merge.merged import Merged

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def truncate(entry: LowRank | Tensor, rank: int | None) -> tuple[LowRank, float, float]:
    """``entry`` as factors of rank <= ``rank``: (factors, squared error, squared norm)."""
    if isinstance(entry, LowRank) and (rank is None or entry.rank <= rank):
        return entry, 0.0, _sq_norm(entry)
    if rank is None:
        raise LorashelfError(
            "this merge is dense (e.g. ties with space='delta'); pass rank=K "
            "(CLI: --rank K) to save it as a rank-K LoRA by SVD truncation"
        )
    if rank < 1:
        raise LorashelfError(f"rank must be >= 1, got {rank}")
    U, S, Vh = _svd(entry)
    k = min(rank, S.numel())
    tail = float((S[k:] ** 2).sum())
    total = float((S**2).sum())
    root = S[:k].sqrt()
    factors = LowRank(A=root[:, None] * Vh[:k], B=U[:, :k] * root, scale=1.0)
    return factors, tail, total


def _sq_norm(f: LowRank) -> float:
    """||scale * B @ A||_F^2 from the r x r Gram matrices, without the dense delta."""
    A, B = f.A.float(), f.B.float()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


def _svd(entry: LowRank | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(entry, LowRank):
        return torch.linalg.svd(entry.float(), full_matrices=False)
    # delta = s * Qb Rb Ra^T Qa^T; only the r x r core Rb Ra^T needs an SVD.
    Qb, Rb = torch.linalg.qr(entry.B.float())
    Qa, Ra = torch.linalg.qr(entry.A.float().T)
    U, S, Vh = torch.linalg.svd(entry.scale * (Rb @ Ra.T))
    return Qb @ U, S, Vh @ Qa.T


def _alpha(f: LowRank) -> float:
    # PEFT applies lora_alpha / r; keep integers integral so configs read naturally.
    alpha = f.scale * f.rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _patterns(factors: dict[str, LowRank]) -> tuple[int, float, dict, dict]:
    """Most common (rank, alpha) as defaults; exact-path patterns for the others."""
    ranks = {n: f.rank for n, f in factors.items()}
    alphas = {n: _alpha(f) for n, f in factors.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != r0}
    alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != a0}
    return r0, a0, rank_pattern, alpha_pattern


def save_peft(
    merged: Merged,
    out_dir: str | os.PathLike[str],
    base_model_id: str,
    rank: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> float:
    """Write ``merged`` as a PEFT LoRA dir; return the relative Frobenius truncation error."""
    from peft import LoraConfig

    out = Path(out_dir)
    if not overwrite and any((out / f).exists() for f in ADAPTER_FILES):
        raise LorashelfError(f"{out} already holds an adapter; pick a new directory")
    factors, tail, total = {}, 0.0, 0.0
    for name in merged.names():
        factors[name], t, n = truncate(merged.modules[name], rank)
        tail, total = tail + t, total + n
    error = math.sqrt(tail / total) if total > 0 else 0.0
    r0, a0, rank_pattern, alpha_pattern = _patterns(factors)
    config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=merged.names(),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, f in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = _cpu(f.A, dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = _cpu(f.B, dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    meta = {
        "method": merged.method,
        "config": to_dict(merged.config),
        "n_experts": merged.n_experts,
        "rank": rank,
        "relative_truncation_error": error,
    }
    write_json_atomic(out / "merge.json", meta)
    return error


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(device="cpu", dtype=dtype).contiguous()
