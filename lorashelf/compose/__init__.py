"""Few-shot composition of a library's experts: LoraHub and the baselines it is judged by.

LoraHub (Huang et al. 2023, arXiv 2307.13269) weighs each expert of a library with one
number found by a gradient-free search on about five examples of a new task:

    from lorashelf.compose import ComposeConfig, compose, draw_shots, save_composition
    shots = draw_shots(task, k=5, seed=0)
    result = compose(model, tokenizer, library, shots, ComposeConfig(budget=40))
    expert = save_composition(result, library, "lorahub-my-task", tasks=[task.id])

``OPTIMISERS`` lists the searches (cma, ngopt, adam), ``PRESELECTORS`` the ways to keep
the N most promising experts first, ``FEWSHOT_METHODS`` the methods ``lorashelf
fewshot`` compares (zero-shot, in-context learning, uniform merge, LoraHub, gradient
weights, a LoRA trained on the shots).
"""

from lorashelf.compose.composed import composed_factors
from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.lorahub import CompositionResult, compose, resolve_experts
from lorashelf.compose.optimisers import OPTIMISERS
from lorashelf.compose.preselect import PRESELECTORS
from lorashelf.compose.save import save_composition
from lorashelf.compose.scoring import PopulationScorer
from lorashelf.compose.shots import ShotBatch, draw_shots, encode_shots, fingerprint

__all__ = [
    "OPTIMISERS",
    "PRESELECTORS",
    "ComposeConfig",
    "CompositionResult",
    "PopulationScorer",
    "ShotBatch",
    "compose",
    "composed_factors",
    "draw_shots",
    "encode_shots",
    "fingerprint",
    "resolve_experts",
    "save_composition",
]
