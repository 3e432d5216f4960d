"""The one PEFT writer and the one SVD truncation every method saves through.

A merge, a LoraHub composition or any other result that reduces to one LoRA becomes a
standard PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
that ``PeftModel.from_pretrained`` loads. ``target_modules`` lists the exact module
paths, so an adapter of some layers only loads as that (PEFT matches a path by its
end, serving engines by its last name); per-module ranks
and alphas that differ from the most common ones go to ``rank_pattern`` /
``alpha_pattern`` under their exact (escaped) paths. A result above the wanted rank is
cut by SVD, the best rank-k approximation in Frobenius norm (Eckart-Young); for a
factored update the SVD runs on the small ``r x r`` core after QR of both factors,
never on a dense matrix (a dense update, e.g. TIES in delta space, is decomposed
directly).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import CONFIG_FILE, WEIGHTS_FILE, LoraFactors

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def sq_norm(f: LoraFactors) -> float:
    """``||scale * B A||_F^2`` from the two ``r x r`` Gram matrices (no dense update)."""
    A, B = f.A.double(), f.B.double()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


def truncate(entry: LoraFactors | Tensor, rank: int) -> tuple[LoraFactors, float, float]:
    """``entry`` (factors or a dense update) as factors of rank <= ``rank``.

    Returns the factors, the squared Frobenius error dropped and the squared norm.
    """
    if rank < 1:
        raise LorashelfError(f"rank must be >= 1 to truncate, got {rank}")
    if isinstance(entry, LoraFactors):
        total = sq_norm(entry)
        if entry.rank <= rank:
            return entry, 0.0, total
        # delta = s * Qb Rb Ra^T Qa^T; only the r x r core Rb Ra^T needs an SVD.
        qb, rb = torch.linalg.qr(entry.B.double())
        qa, ra = torch.linalg.qr(entry.A.double().T)
        u, s, vh = torch.linalg.svd(entry.scale * (rb @ ra.T))
        u, vh = qb @ u, vh @ qa.T
    else:
        u, s, vh = torch.linalg.svd(entry.double(), full_matrices=False)
        total = float((s**2).sum())
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    factors = LoraFactors(
        A=(root[:, None] * vh[:k]).float(), B=(u[:, :k] * root).float(), scale=1.0
    )
    return factors, float((s[k:] ** 2).sum()), total


def truncate_all(
    modules: Mapping[str, LoraFactors | Tensor], rank: int | None
) -> tuple[dict[str, LoraFactors], float]:
    """Every module cut to ``rank`` (None: factors unchanged) and the relative Frobenius
    error ``sqrt(sum dropped^2 / sum ||delta||^2)`` over all modules."""
    if rank is None:
        dense = [m for m, f in modules.items() if not isinstance(f, LoraFactors)]
        if dense:
            raise LorashelfError(
                f"the result is dense at {dense[0]} (e.g. ties with space='delta'); pass "
                "rank=K (CLI: --rank K) to save it as a rank-K LoRA by SVD truncation"
            )
        return dict(modules), 0.0  # type: ignore[arg-type]
    out, dropped, total = {}, 0.0, 0.0
    for module, f in modules.items():
        out[module], d, n = truncate(f, rank)
        dropped, total = dropped + d, total + n
    return out, (dropped / total) ** 0.5 if total > 0 else 0.0


def _alpha(f: LoraFactors) -> float | int:
    alpha = f.scale * f.rank  # PEFT applies lora_alpha / r; keep integers integral
    return int(alpha) if float(alpha).is_integer() else alpha


def lora_config(factors: Mapping[str, LoraFactors], base_model: str) -> Any:
    """The PEFT ``LoraConfig`` describing ``factors`` exactly."""
    from peft import LoraConfig

    if not factors:
        raise LorashelfError("nothing to write: the adapter has no modules")
    ranks = {m: f.rank for m, f in factors.items()}
    alphas = {m: _alpha(f) for m, f in factors.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=sorted(factors),  # exact paths: a partial adapter stays partial
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != a0},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    return config


def write_peft_adapter(
    factors: Mapping[str, LoraFactors],
    out_dir: str | os.PathLike[str],
    base_model: str,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``factors`` as a PEFT LoRA dir; returns its adapter config as a dict."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if not overwrite and any((out / f).exists() for f in ADAPTER_FILES):
        raise LorashelfError(f"{out} already holds an adapter; pick a new directory")
    config = lora_config(factors, base_model)
    tensors = {}
    for m, f in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = _cpu(f.A, dtype)
        tensors[f"base_model.model.{m}.lora_B.weight"] = _cpu(f.B, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    _sort_target_modules(out / CONFIG_FILE)
    return config.to_dict()


def _sort_target_modules(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set, so its saved order depends on the
    process's hash seed; sorted, the same adapter gives the same bytes every time."""
    import json

    from lorashelf.config import write_json_atomic

    doc = json.loads(path.read_text())
    if isinstance(doc.get("target_modules"), list):
        doc["target_modules"] = sorted(doc["target_modules"])
        write_json_atomic(path, doc)


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(device="cpu", dtype=dtype).contiguous()
