"""Weight-space merges of a library's LoRA experts: uniform, uniform-delta, TIES.

``merge(experts, method, config)`` turns a list of experts (each a dict from base-model
module path to LoRA factors, as ``Expert.lora_factors()`` returns) into a
:class:`Merged`, which can be folded into a model and undone exactly
(``with merged.apply(model): ...``) or written as a PEFT adapter
(``merged.save_peft(dir, base_model_id)``) so the merge joins the library as an expert.
Methods live in ``MERGES``; each takes its own frozen config dataclass.

    experts = [lib.get(n).lora_factors() for n in lib.names()]
    merged = merge(experts, "ties", TiesConfig(density=0.2))
    with merged.apply(model):
        ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lorashelf.config import from_dict
from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.merge.base import Expert, MergeMethod
from lorashelf.merge.merged import AppliedMerge, Merged
from lorashelf.merge.registry import MERGES
from lorashelf.merge.ties import TiesConfig
from lorashelf.merge.uniform import UniformConfig, UniformDeltaConfig


def merge(
    experts: Sequence[Expert],
    method: str,
    config: Any = None,
    *,
    progress: bool = False,
) -> Merged:
    """Merge ``experts`` with the registered ``method``.

    ``config`` is the method's config dataclass, a dict of its fields, or None for the
    defaults; ``progress`` shows a progress bar for slow methods.
    """
    spec = MERGES.get(method)
    if config is None:
        config = spec.config_cls()
    elif isinstance(config, dict):
        config = from_dict(spec.config_cls, config)
    elif not (dataclasses.is_dataclass(config) and isinstance(config, spec.config_cls)):
        raise LorashelfError(
            f"merge method {method!r} takes a {spec.config_cls.__name__}, "
            f"got {type(config).__name__}"
        )
    return spec.fn(list(experts), config, progress=progress)


__all__ = [
    "MERGES",
    "AppliedMerge",
    "Expert",
    "LoraFactors",
    "LoraFactors",
    "MergeMethod",
    "Merged",
    "TiesConfig",
    "UniformConfig",
    "UniformDeltaConfig",
    "merge",
]
