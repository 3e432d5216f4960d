"""Write a composition into the library as a new expert (a standard PEFT LoRA adapter).

The composed factors become ``adapter_config.json`` + ``adapter_model.safetensors``
that ``PeftModel.from_pretrained`` loads: for ``mix="params"`` exactly the
reference's merged LoRA (``sum w_e A_e``, ``sum w_e B_e`` at the experts' rank and
alpha); for ``mix="output"`` the weighted sum of the experts' updates, either exact
(the concatenated factors, rank = sum of ranks) or cut by SVD to a chosen rank with
the relative truncation error recorded. The card says where it came from
(``source="compose"``) and keeps the weights per expert name, the shots' fingerprint,
the config and the search trace under ``extra``. The adapter is written to a
temporary directory and handed to ``Library.add``, which checks it before anything
lands in the library: a failure at any step leaves the library as it was.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorashelf.compose.composed import is_zero, truncate_all
from lorashelf.compose.lorahub import CompositionResult
from lorashelf.errors import LorashelfError
from lorashelf.library import Expert, Library, LoraFactors


def saved_rank(result: CompositionResult, rank: int | None = None) -> int | None:
    """The rank to cut to (None: exact). ``rank`` overrides ``config.save_rank``:
    None = the experts' rank (exact for ``params``), 0 = exact, K = K."""
    want = result.config.save_rank if rank is None else rank
    if want == 0 or (want is None and result.config.mix == "params"):
        return None
    return want if want is not None else result.expert_rank


def write_peft(factors: dict[str, LoraFactors], out_dir: Path, base_model: str) -> dict[str, Any]:
    """A PEFT LoRA dir for ``factors``; returns its adapter config as a dict."""
    from peft import LoraConfig

    ranks = {m: f.rank for m, f in factors.items()}
    alphas = {m: _alpha(f) for m, f in factors.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in factors}),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != a0},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    tensors = {}
    for m, f in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = _cpu(f.A)
        tensors[f"base_model.model.{m}.lora_B.weight"] = _cpu(f.B)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    return config.to_dict()


def _alpha(f: LoraFactors) -> float | int:
    alpha = f.scale * f.rank  # PEFT applies lora_alpha / r
    return int(alpha) if float(alpha).is_integer() else alpha


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def save_composition(
    result: CompositionResult,
    library: Library,
    name: str,
    *,
    tasks: Sequence[str] = (),
    rank: int | None = None,
    allow_mixed: bool = False,
    overwrite: bool = False,
) -> Expert:
    """Add ``result`` to ``library`` as expert ``name``; returns the new expert.

    ``rank`` overrides ``result.config.save_rank`` (None: the experts' rank; 0: exact;
    K: SVD-truncated to K). Raises, writing nothing, if the composition is all zero.
    """
    if is_zero(result.factors):
        raise LorashelfError(
            "the composition's weights are all zero, so the composed expert equals the base "
            "model; nothing was saved (lower --l1, raise --budget or pick other experts)"
        )
    cut = saved_rank(result, rank)
    factors, error = truncate_all(result.factors, cut)
    card = {
        "tasks": list(tasks),
        "source": "compose",
        "data_fingerprint": result.examples_fingerprint,
        "origin": {"method": "lorahub", "experts": list(result.experts)},
        "extra": {
            **result.summary(),
            "rank": max(f.rank for f in factors.values()),
            "truncated_to": cut,
            "relative_truncation_error": error,
        },
    }
    with tempfile.TemporaryDirectory(prefix="lorashelf-compose-") as tmp:
        write_peft(factors, Path(tmp), library.base_model)
        return library.add(tmp, name=name, card=card, allow_mixed=allow_mixed, overwrite=overwrite)
