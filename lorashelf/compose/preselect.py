"""Keep the N most promising experts before a LoraHub search.

LoraHub's search space grows with the number of experts while its budget does not
(40 evaluations for 20 experts in Huang et al. 2023, arXiv 2307.13269, which samples
the 20 at random from ~200). A preselector ranks the library on the shots instead:
``loss`` scores each expert alone (weight 1) on the shots, all experts in one batched
pass, and keeps the N lowest; ``arrow`` runs the shots through the base model routed
by Arrow (Ostapenko et al. 2024, arXiv 2405.11157: per-token alignment with each
expert's top singular vector, lorashelf.route) and keeps the N experts receiving the
most routing mass. A new preselector is one function and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.scoring import PopulationScorer
from lorashelf.compose.shots import ShotBatch
from lorashelf.lora.stack import Experts
from lorashelf.registry import Registry

# (model, experts, shots, config) -> one score per expert; higher is better
Preselector = Callable[[nn.Module, Experts, ShotBatch, ComposeConfig], list[float]]


def by_loss(model: nn.Module, experts: Experts, shots: ShotBatch, config: ComposeConfig):
    """Minus each expert's own loss on the shots (one-hot weights, batched)."""
    with PopulationScorer.from_config(model, experts, shots, config) as scorer:
        losses = scorer.losses(torch.eye(len(experts)))
    return (-losses).tolist()


# "arrow" is Arrow's own usage count (lorashelf.route.arrow), named here lazily, so
# composition reads it without importing its sibling package.
PRESELECTORS: Registry[Preselector] = Registry(
    "preselector", {"loss": by_loss, "arrow": "lorashelf.route.arrow:preselect_scores"}
)


def preselect(
    model: nn.Module, experts: Experts, shots: ShotBatch, config: ComposeConfig
) -> tuple[list[int], dict[str, float]]:
    """Indices (in library order) of the ``config.preselect`` best experts, and all scores."""
    assert config.preselect is not None
    scores = PRESELECTORS.get(config.preselect_by)(model, experts, shots, config)
    order = sorted(range(len(experts)), key=lambda i: (-scores[i], i))
    keep = sorted(order[: config.preselect])
    return keep, {name: float(s) for (name, _), s in zip(experts, scores)}
