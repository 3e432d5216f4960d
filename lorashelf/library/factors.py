"""A PEFT LoRA adapter as per-module low-rank factors: the form every method reads.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds ``scale * B @ A`` to a linear weight, with
``A: [r, d_in]``, ``B: [d_out, r]`` and ``scale = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` for rank-stabilised LoRA, Kalajdzievski 2023, arXiv 2312.03732). PEFT stores
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` in
``adapter_model.safetensors`` and per-module ranks and alphas in ``rank_pattern`` and
``alpha_pattern`` (regex keys matched against the end of the module path, first match
wins). :func:`read_lora_factors` returns ``{module path: LoraFactors}`` keyed by the
base model's module path (``model.layers.0.self_attn.q_proj``); Arrow routing, MBC,
LoraHub and merges all start from it. Variants whose update is not ``scale * B @ A``
(DoRA, LoRA biases, embedding or convolution LoRA, ...) are refused by name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorashelf.errors import LorashelfError

if TYPE_CHECKING:  # torch is imported where tensors are made, keeping `ls` light
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight"
)
# (marker in a tensor key, what it means) for tensors a plain LoRA never has
_FOREIGN_KEYS = (
    ("lora_magnitude_vector", "DoRA (use_dora=True)"),
    ("lora_embedding_", "LoRA on embedding layers"),
    (".lora_B.bias", "LoRA biases (lora_bias=True)"),
    ("modules_to_save", "fully trained extra modules (modules_to_save)"),
    ("trainable_tokens", "trainable token embeddings (trainable_token_indices)"),
)
# (config field, what it means) for settings that change LoRA's update rule
_VARIANT_FLAGS = (
    ("use_dora", "DoRA (use_dora=True)"),
    ("lora_bias", "LoRA biases (lora_bias=True)"),
    ("use_qalora", "QALoRA (use_qalora=True)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("arrow_config", "an Arrow router (arrow_config)"),
    ("modules_to_save", "fully trained extra modules (modules_to_save)"),
    ("trainable_token_indices", "trainable token embeddings (trainable_token_indices)"),
    ("target_parameters", "LoRA on raw parameters (target_parameters)"),
    ("layer_replication", "layer replication (layer_replication)"),
)
# initialisations that rewrite the base weights, so the saved factors need that base
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One module's LoRA update ``scale * B @ A`` (``A: [r, d_in]``, ``B: [d_out, r]``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense float32 update ``[d_out, d_in]`` (mind the memory for big modules)."""
        return self.scale * (self.B.float() @ self.A.float())


def unsupported_variant(config: Mapping[str, Any]) -> str | None:
    """What makes ``config`` something other than a plain LoRA, or None if it is one."""
    peft_type = config.get("peft_type", "")
    peft_type = str(getattr(peft_type, "value", peft_type))  # PEFT's enum in live configs
    if peft_type.upper() != "LORA":
        return f"peft_type {peft_type!r} (only LORA adapters are supported)"
    for field, what in _VARIANT_FLAGS:
        if config.get(field):
            return what
    if config.get("bias", "none") not in (None, "none"):
        return f"trained base biases (bias={config['bias']!r})"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        return (
            f"init_lora_weights={init!r}, which rewrites the base weights; save it with "
            "save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    return None


def check_plain_lora(config: Mapping[str, Any], what: str = "adapter") -> None:
    problem = unsupported_variant(config)
    if problem:
        raise LorashelfError(
            f"{what} uses {problem}, which lorashelf does not support; use a plain LoRA adapter"
        )


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: first key matching the path's end."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), honouring the per-module patterns."""
    r = int(pattern_value(config.get("rank_pattern"), module, config.get("r", rank)))
    if r != rank:
        raise LorashelfError(
            f"adapter_config.json gives module {module} rank {r} but its weights have rank "
            f"{rank}; the config and the weights come from different adapters"
        )
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_pairs(
    state_dict: Mapping[str, torch.Tensor], what: str = "adapter"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` from PEFT tensor names; foreign tensors are refused.

    Only names and ``.shape`` are read, so the values may be tensors or header entries.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in state_dict.items():
        m = _KEY.fullmatch(key)
        if m is None:
            kind = next((w for marker, w in _FOREIGN_KEYS if marker in key), None)
            detail = f"uses {kind}, which lorashelf does not support" if kind else "has a tensor"
            raise LorashelfError(
                f"{what} {detail} ({key!r} is not a LoRA A/B weight); use a plain LoRA adapter"
            )
        adapters.add(m["adapter"])
        halves.setdefault(m["module"], {})[m["ab"]] = tensor
    if len(adapters) > 1:
        names = ", ".join(sorted(str(a) for a in adapters))
        raise LorashelfError(f"{what} holds several adapters ({names}); save them one per dir")
    pairs = {}
    for module in sorted(halves, key=_natural_key):
        ab = halves[module]
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LorashelfError(f"{what} has no {missing} weight for {module}; it is incomplete")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise LorashelfError(
                f"{what} has {len(a.shape)}-d LoRA weights for {module} (convolution LoRA?); "
                "only LoRA on linear layers is supported"
            )
        if a.shape[0] != b.shape[1]:
            raise LorashelfError(
                f"{what}: {module} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}"
            )
        pairs[module] = (a, b)
    if not pairs:
        raise LorashelfError(f"{what} has no LoRA weights")
    return pairs


def factors_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    what: str = "adapter",
) -> dict[str, LoraFactors]:
    check_plain_lora(config, what)
    out = {}
    for module, (a, b) in lora_pairs(state_dict, what).items():
        scale = module_scale(config, module, int(a.shape[0]))
        out[module] = LoraFactors(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scale
        )
    return out


def read_lora_factors(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, LoraFactors]:
    """``{module path: LoraFactors}`` of a PEFT adapter dir, or of a state dict + its config.

    Module paths are the base model's (``model.layers.0.self_attn.q_proj``), in layer
    order. ``device``/``dtype`` default to the stored ones. A state dict must hold only
    the adapter's tensors, as saved or as ``peft.get_peft_model_state_dict`` returns
    them (names with an adapter segment, ``lora_A.default.weight``, are accepted too).
    """
    if isinstance(source, Mapping):
        if config is None:
            raise TypeError("read_lora_factors(state_dict) needs the adapter config too")
        return factors_from_state_dict(source, config, device=device, dtype=dtype)
    from safetensors.torch import load_file

    path = Path(source)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LorashelfError(
            f"{path} has no {WEIGHTS_FILE}; a PEFT adapter dir is needed "
            "(save it with save_pretrained(..., safe_serialization=True))"
        )
    what = f"adapter {str(path)!r}"
    if config is None:
        from lorashelf.library.adapter import read_config  # adapter.py imports this module

        if not (path / CONFIG_FILE).is_file():
            raise LorashelfError(f"{path} has no {CONFIG_FILE}; a PEFT adapter dir is needed")
        config = read_config((path / CONFIG_FILE).read_bytes(), path / CONFIG_FILE, what)
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LorashelfError(
            f"{what}: {weights} is not a readable safetensors file ({e})"
        ) from None
    return factors_from_state_dict(state_dict, config, device=device, dtype=dtype, what=what)


def _natural_key(module: str) -> list[Any]:
    """Sort ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in module.split(".")]
