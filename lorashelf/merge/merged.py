"""The result of a merge: one delta per module, folded into a model and undone exactly.

A :class:`Merged` maps base-model module paths ("model.layers.0.self_attn.q_proj") to
either a :class:`LoraFactors` (delta = scale * B @ A, kept factored) or a dense fp32 delta
``[d_out, d_in]``. :meth:`Merged.apply` adds the deltas to the base weights in place
(computed in fp32, written in the model's dtype) and returns a handle whose ``restore()``
(or context-manager exit) copies back the original weights saved before the change:
bf16 add-then-subtract would not give the original bits back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors


@dataclass
class Merged:
    """Per-module merged deltas plus the method and config that made them."""

    method: str
    config: Any
    n_experts: int
    modules: dict[str, LoraFactors | Tensor] = field(repr=False)

    def names(self) -> list[str]:
        return sorted(self.modules)

    @property
    def is_low_rank(self) -> bool:
        return all(isinstance(v, LoraFactors) for v in self.modules.values())

    def delta(self, name: str) -> Tensor:
        """The dense fp32 delta of one module."""
        entry = self.modules[name]
        return entry.delta() if isinstance(entry, LoraFactors) else entry.float()

    def apply(self, model: nn.Module) -> AppliedMerge:
        """Fold the merge into ``model``'s weights in place; undo with ``restore()``.

        Usage: ``with merged.apply(model): evaluate(model)``.
        """
        targets = {name: find_weight(model, name) for name in self.names()}
        saved: dict[str, Tensor] = {}
        with torch.no_grad():
            try:
                for name, weight in targets.items():
                    if tuple(weight.shape) != tuple(self._shape(name)):
                        raise LorashelfError(
                            f"module {name}: weight is {list(weight.shape)} but the merge "
                            f"delta is {list(self._shape(name))}; apply it to its base model"
                        )
                    saved[name] = weight.detach().clone()
                    delta = self._delta_on(name, weight.device)
                    weight.copy_((weight.float() + delta).to(weight.dtype))
            except BaseException:
                _copy_back(targets, saved)
                raise
        return AppliedMerge(targets, saved)

    def save_peft(
        self,
        out_dir: str | os.PathLike[str],
        base_model_id: str,
        rank: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        overwrite: bool = False,
    ) -> float:
        """Write a standard PEFT LoRA adapter dir; return the relative Frobenius error.

        Low-rank results are written exactly when ``rank`` is None. Dense results (and
        low-rank ones above ``rank``) are truncated by SVD to ``rank``; the returned error
        is ||delta - truncated||_F / ||delta||_F over all modules (0.0 when exact).
        """
        from lorashelf.config import to_dict, write_json_atomic
        from lorashelf.lora.peft import truncate_all, write_peft_adapter

        factors, error = truncate_all(self.modules, rank)
        write_peft_adapter(factors, out_dir, base_model_id, dtype=dtype, overwrite=overwrite)
        meta = {
            "method": self.method,
            "config": to_dict(self.config),
            "n_experts": self.n_experts,
            "rank": rank,
            "relative_truncation_error": error,
        }
        write_json_atomic(Path(out_dir) / "merge.json", meta)
        return error

    def _shape(self, name: str) -> tuple[int, int]:
        e = self.modules[name]
        return (e.B.shape[0], e.A.shape[1]) if isinstance(e, LoraFactors) else tuple(e.shape)

    def _delta_on(self, name: str, device: torch.device) -> Tensor:
        e = self.modules[name]
        if isinstance(e, LoraFactors):
            B = e.B.to(device=device, dtype=torch.float32)
            return e.scale * (B @ e.A.to(device=device, dtype=torch.float32))
        return e.to(device=device, dtype=torch.float32)


class AppliedMerge:
    """Handle returned by :meth:`Merged.apply`; restores the original weights exactly."""

    def __init__(self, targets: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
        self._targets = targets
        self._saved = saved

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def restore(self) -> None:
        """Copy the saved weights back (idempotent)."""
        with torch.no_grad():
            _copy_back(self._targets, self._saved)
        self._saved = {}

    def __enter__(self) -> AppliedMerge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _copy_back(targets: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    for name, original in saved.items():
        targets[name].copy_(original)


def find_weight(model: nn.Module, path: str) -> Tensor:
    """The weight of the linear layer at base-model ``path``.

    Accepts the bare model or a wrapper around it (e.g. a PeftModel, whose paths carry
    a prefix and whose LoRA layers keep the original layer as ``base_layer``).
    """
    try:
        module = model.get_submodule(path)
    except AttributeError:
        hits = [m for n, m in model.named_modules() if n.endswith("." + path)]
        if len(hits) != 1:
            raise LorashelfError(
                f"the model has no module {path!r}; apply the merge to the base model "
                "its experts were trained on"
            ) from None
        module = hits[0]
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise LorashelfError(f"module {path!r} has no 2-D weight to merge into")
    return weight
