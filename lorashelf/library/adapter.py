"""Inspect a PEFT adapter dir before it enters a library, and check the library policy.

Everything is checked before anything is written: the adapter is a plain LoRA
(``peft_type`` LORA, no DoRA or other variant) whose ``adapter_config.json`` is a JSON
object with well-typed fields, its weights are floating-point safetensors whose keys
are exactly the LoRA A/B pairs of the modules the config targets, every value is
finite, no module's update ``scale * B @ A`` is implausibly large (a ``lora_alpha`` of
``1e30`` is finite but turns every forward pass into inf/NaN), and it names its base
model, compared in full (``HuggingFaceTB/SmolLM2-135M`` is not ``...-135M-Instruct``). The files are read once, into memory: the
bytes that were checked are the bytes that get written and hashed. The library policy
(one set of target modules and one rank, unless mixing is allowed) is a pure function
of ``library.json`` and the inspected adapter.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_plain_lora,
    lora_pairs,
    module_scale,
)

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# Largest accepted Frobenius norm of one module's update scale * B @ A. Base weights of
# LLM linear layers have norms of about 10-100 and trained LoRA updates of about 0.1-10;
# an update 10^4 times larger than any weight can only destroy the model (its
# activations overflow fp16 and bf16 soon after). The bound is loose on purpose.
MAX_UPDATE_NORM = 1e6
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,),
    "lora_alpha": (int, float),
    "target_modules": (list, str, type(None)),
    "rank_pattern": (dict, type(None)),
    "alpha_pattern": (dict, type(None)),
    "base_model_name_or_path": (str, type(None)),
    "use_rslora": (bool, type(None)),
}


@dataclass(frozen=True)
class Adapter:
    """A checked adapter, held in memory until it is written."""

    config: dict[str, Any]
    files: dict[str, bytes]  # file name -> bytes, exactly as read
    base_model_exact: str | None
    modules: dict[str, tuple[int, int, int]]  # module path -> (r, d_in, d_out)

    @property
    def target_modules(self) -> list[str]:
        """The module names that carry LoRA weights (last path component), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({r for r, _, _ in self.modules.values()})

    @property
    def rank(self) -> int | None:
        """The adapter's rank, or None when rank_pattern gives modules different ranks."""
        ranks = self.ranks
        return ranks[0] if len(ranks) == 1 else None


def read_adapter(src: Path, what: str) -> Adapter:
    """Read and check the PEFT adapter dir ``src``; raise a LorashelfError naming the fix."""
    if not src.is_dir():
        raise LorashelfError(f"{what}: {src} is not a directory; pass a PEFT adapter dir")
    if not (src / CONFIG_FILE).is_file():
        raise LorashelfError(f"{what}: {src} has no {CONFIG_FILE}; is it a PEFT adapter dir?")
    if not (src / WEIGHTS_FILE).is_file():
        hint = (
            "it has a pickled adapter_model.bin, which lorashelf does not load; re-save it "
            "with PeftModel.from_pretrained(...).save_pretrained(dir)"
            if (src / "adapter_model.bin").exists()
            else "re-save it with save_pretrained(dir)"
        )
        raise LorashelfError(f"{what}: {src} has no {WEIGHTS_FILE}; {hint}")
    files = {name: (src / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    config = read_config(files[CONFIG_FILE], src / CONFIG_FILE, what)
    check_plain_lora(config, what)
    state_dict = _load_safetensors(files[WEIGHTS_FILE], src / WEIGHTS_FILE, what)
    pairs = lora_pairs(state_dict, what)
    check_targets(config.get("target_modules"), list(pairs), what)
    check_floating(state_dict, what)
    check_finite(state_dict, what)
    for module, (a, b) in pairs.items():
        scale = module_scale(config, module, int(a.shape[0]))  # rank agrees with the config
        check_update_norm(module, a, b, scale, what)
    modules = {
        m: (int(a.shape[0]), int(a.shape[1]), int(b.shape[0])) for m, (a, b) in pairs.items()
    }
    return Adapter(config, files, config.get("base_model_name_or_path") or None, modules)


def read_config(data: bytes, path: Path, what: str) -> dict[str, Any]:
    """``adapter_config.json`` as a dict whose fields lorashelf reads have their types."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LorashelfError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LorashelfError(
            f"{what}: {path} holds a JSON {type(config).__name__}, not an object; "
            "re-save the adapter with save_pretrained(dir)"
        )
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        bad_bool = isinstance(value, bool) and bool not in types
        if key in config and (bad_bool or not isinstance(value, types)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise LorashelfError(
                f"{what}: {path} field {key!r} must be {names}, not {value!r}; fix the config"
            )
    if "r" in config and config["r"] < 1:
        raise LorashelfError(f"{what}: {path} has rank r={config['r']}; it must be at least 1")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (config.get(key) or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise LorashelfError(
                    f"{what}: {path} {key}[{pattern!r}] must be a positive number, not {value!r}"
                )
    return config


def check_floating(state_dict: Mapping[str, Any], what: str) -> None:
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise LorashelfError(
                f"{what}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                "but LoRA weights are floating point; re-save the adapter from a trained model"
            )


def update_norm(a: Any, b: Any, scale: float) -> float:
    """``||scale * B @ A||_F``, computed in float64 without forming ``B @ A``."""
    import torch

    a64, b64 = a.double(), b.double()
    # ||B A||_F^2 = trace((B^T B)(A A^T)): two r x r products, cheap for any module size
    sq = float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)).clamp(min=0.0))
    return abs(scale) * math.sqrt(sq)


def check_update_norm(module: str, a: Any, b: Any, scale: float, what: str) -> None:
    """``||scale * B @ A||_F`` is finite and at most :data:`MAX_UPDATE_NORM`."""
    norm = update_norm(a, b, scale)
    if not math.isfinite(norm) or norm > MAX_UPDATE_NORM:
        raise LorashelfError(
            f"{what}: the update of {module} has norm {norm:.3g} (scale lora_alpha/r = "
            f"{scale:.3g}); anything above {MAX_UPDATE_NORM:g} makes the model output inf/NaN. "
            "Check lora_alpha in adapter_config.json, or retrain with a lower learning rate"
        )


class _Header(NamedTuple):
    shape: tuple[int, ...]


def modules_from_header(path: Path, what: str = "adapter") -> dict[str, tuple[int, int, int]]:
    """``{module: (r, d_in, d_out)}`` from a safetensors header alone (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size < MAX_HEADER:
            raise LorashelfError(f"{what}: {path} is not a safetensors file")
        header = json.loads(f.read(size))
    shapes = {k: _Header(tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    pairs = lora_pairs(shapes, what)
    return {m: (a.shape[0], a.shape[1], b.shape[0]) for m, (a, b) in pairs.items()}


def _load_safetensors(data: bytes, path: Path, what: str) -> Mapping[str, Any]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LorashelfError(f"{what}: {path} is not a readable safetensors file ({e})") from None


def _targeted(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def check_targets(targets: Any, modules: list[str], what: str) -> None:
    """The weights' modules are exactly those ``target_modules`` (list or regex) selects."""
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        stray = [m for m in modules if re.fullmatch(targets, m) is None]
        unused: list[str] = []
    else:
        stray = [m for m in modules if not any(_targeted(m, t) for t in targets)]
        unused = [t for t in targets if not any(_targeted(m, t) for m in modules)]
    if stray:
        raise LorashelfError(
            f"{what} has LoRA weights for {stray[0]}, which its adapter_config.json "
            f"target_modules ({_fmt(targets)}) does not select; the config and the weights "
            "do not belong together, re-save the adapter"
        )
    if unused:
        have = ",".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))
        raise LorashelfError(
            f"{what}: adapter_config.json targets {_fmt(targets)} but the weights only hold "
            f"{have} (no {','.join(unused)}); the config and the weights do not belong "
            "together, re-save the adapter"
        )


def check_finite(state_dict: Mapping[str, Any], what: str) -> None:
    import torch

    for key, tensor in state_dict.items():
        if not bool(torch.isfinite(tensor).all()):
            raise LorashelfError(
                f"{what} has NaN or inf values in {key}; training diverged, retrain it "
                "(e.g. with a lower learning rate)"
            )


def check_base(
    adapter_base: str | None,
    caller_base: str | None,
    library_base: str,
    what: str,
    *,
    allow_base: bool = False,
) -> str:
    """The exact base the adapter was made on; it must be the library's (its full id,
    alias-aware), unless ``allow_base`` (the caller vouches the weights fit)."""
    from lorashelf.models import same_base

    if adapter_base and caller_base and not same_base(adapter_base, caller_base):
        raise LorashelfError(
            f"{what}: adapter_config.json names base {adapter_base!r} but the card says "
            f"{caller_base!r}; fix one of them"
        )
    base = caller_base or adapter_base
    if allow_base:
        return base or library_base
    if not base:
        raise LorashelfError(
            f"{what} does not name its base model (base_model_name_or_path is empty in "
            f"adapter_config.json); set it to the model it was trained on, e.g. {library_base!r}"
        )
    if not same_base(base, library_base):
        raise LorashelfError(
            f"{what} was trained on {base!r} but the library is for {library_base!r}; add it "
            f"to a library for its base (`lorashelf library init DIR --base {base}`), or pass "
            "--allow-base (allow_base=True) if it was trained on this library's model"
        )
    return base


def apply_policy(meta: dict[str, Any], adapter: Adapter, what: str, allow_mixed: bool) -> dict:
    """``library.json`` after adding ``adapter``; raises if it breaks the library's policy."""
    new = copy.deepcopy(meta)
    policy = new["rank_policy"]
    mixed_ok = bool(policy.get("allow_mixed")) or allow_mixed
    targets = adapter.target_modules
    if new.get("target_modules") is None:
        new["target_modules"] = targets
    elif targets != new["target_modules"]:
        if not mixed_ok:
            raise LorashelfError(
                f"{what} targets {','.join(targets)} but the library targets "
                f"{','.join(new['target_modules'])}; retrain or pass --allow-mixed"
            )
        policy["allow_mixed"] = True
    rank, lib_rank = adapter.rank, policy.get("rank")
    if rank is None and not mixed_ok:
        raise LorashelfError(
            f"{what} has ranks {','.join(map(str, adapter.ranks))} across its modules "
            "(rank_pattern) but the library holds one rank; retrain or pass --allow-mixed"
        )
    if rank is not None and lib_rank is not None and rank != lib_rank and not mixed_ok:
        raise LorashelfError(
            f"{what} has rank {rank} but the library holds rank-{lib_rank} experts; "
            f"retrain with r={lib_rank} or pass --allow-mixed"
        )
    if rank is None or (lib_rank is not None and rank != lib_rank):
        policy["allow_mixed"] = True
    if lib_rank is None and rank is not None:
        policy["rank"] = rank
    return new


def _fmt(targets: Any) -> str:
    return targets if isinstance(targets, str) else ",".join(sorted(targets))
