"""The base model's linear-module shapes, recorded in ``library.json`` to check imports.

An adapter made for another model size, or naming a layer the base model lacks, loads
fine as a PEFT dir but breaks every method that stacks experts (Arrow, merges, MBC).
So the library keeps ``module_shapes``: ``{module path: [d_in, d_out]}`` of every
``nn.Linear`` of its base model, and every import must fit it. They come from the
base model's ``config.json`` when the library is created from a local model dir (the
model is built on PyTorch's ``meta`` device: no weights are read, no custom code
runs); otherwise the first expert imported defines them (``module_shapes_from`` names
it) and later experts must agree with it module by module, with the same shape for
every module of one kind (``q_proj``, ...) and no layer index beyond the known ones.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError

log = logging.getLogger("lorashelf.library")

SHAPES_KEY = "module_shapes"
SOURCE_KEY = "module_shapes_from"
FROM_BASE = "base config"
_LAYER = re.compile(r"^(?P<stack>.*?)\.(?P<index>\d+)\.")


def shapes_from_base_config(path: Path) -> dict[str, list[int]] | None:
    """``{module: [d_in, d_out]}`` of the linear layers of the model ``path`` configures
    (a model dir or its config.json), or None when it cannot be built from the config."""
    config_dir = path.parent if path.name == "config.json" else path
    if not (config_dir / "config.json").is_file():
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(config_dir))  # never trusts remote code
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any model transformers cannot build: fall back to the first expert
        log.info("no module shapes from %s (%s); the first expert will define them", path, e)
        return None
    return {
        name: [int(m.in_features), int(m.out_features)]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def cached_base_config(base_model: str, home: Path) -> Path | None:
    """The local model dir of ``base_model``: a path, or a known model converted in
    ``HOME/models`` (``lorashelf model pull``); None when only the hub has it."""
    from lorashelf.models.known import KNOWN, canonical_id

    if Path(base_model).expanduser().is_dir():
        return Path(base_model).expanduser()
    hub_id = canonical_id(base_model)
    for km in KNOWN.values():
        path = Path(home) / "models" / km.name
        if km.hub_id == hub_id and (path / "config.json").is_file():
            return path
    return None


def check_shapes(
    meta: Mapping[str, Any], modules: Mapping[str, tuple[int, int, int]], what: str
) -> None:
    """Raise naming the module unless every ``(r, d_in, d_out)`` fits the library's shapes."""
    known: dict[str, list[int]] | None = meta.get(SHAPES_KEY)
    if not known:
        return
    from_base = meta.get(SOURCE_KEY, FROM_BASE) == FROM_BASE
    source = (
        f"the base model {meta['base_model']!r}"
        if from_base
        else f"the library's first expert {meta.get(SOURCE_KEY)!r}"
    )
    by_kind = {m.rsplit(".", 1)[-1]: tuple(s) for m, s in known.items()}
    top_index = _top_layer_index(known)
    for module, (_, d_in, d_out) in sorted(modules.items()):
        want = known.get(module)
        if want is None and from_base:
            raise LorashelfError(
                f"{what} has LoRA weights for {module}, which {source} does not have; it "
                f"was made for another model, use a library for that model"
            )
        if want is None:
            want = by_kind.get(module.rsplit(".", 1)[-1])
            stack = _LAYER.match(module)
            if stack and int(stack["index"]) > top_index.get(stack["stack"], 1 << 30):
                raise LorashelfError(
                    f"{what} has LoRA weights for {module}, but {source} has no layer "
                    f"{stack['index']} ({stack['stack']} stops at {top_index[stack['stack']]}); "
                    "it was made for another model, use a library for that model"
                )
        if want is not None and (d_in, d_out) != tuple(want):
            raise LorashelfError(
                f"{what}: {module} maps {d_in} -> {d_out} features but in {source} it maps "
                f"{want[0]} -> {want[1]}; it was made for another model size, use a "
                "library for that model"
            )


def record_shapes(
    meta: dict[str, Any], modules: Mapping[str, tuple[int, int, int]], expert: str
) -> dict[str, Any]:
    """``meta`` with the shapes of modules it does not know yet (first-expert libraries)."""
    if meta.get(SHAPES_KEY) and meta.get(SOURCE_KEY, FROM_BASE) == FROM_BASE:
        return meta
    known = dict(meta.get(SHAPES_KEY) or {})
    new = {m: [d_in, d_out] for m, (_, d_in, d_out) in modules.items() if m not in known}
    if not new:
        return meta
    out = copy.deepcopy(meta)
    out[SHAPES_KEY] = dict(sorted({**known, **new}.items()))
    out.setdefault(SOURCE_KEY, expert)
    return out


def _top_layer_index(shapes: Mapping[str, Any]) -> dict[str, int]:
    """``{layer stack path: largest index}``, e.g. ``{"model.layers": 29}``."""
    top: dict[str, int] = {}
    for module in shapes:
        if m := _LAYER.match(module):
            top[m["stack"]] = max(top.get(m["stack"], 0), int(m["index"]))
    return top
