"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): ``scale * sum_e delta_e``.

The merged update adds every expert's task vector, scaled by one ``scale`` (the paper's
lambda, typically 0.3-1.0). It is kept factored, exactly: the experts' factors are
concatenated (rank = sum of ranks) by the core's one weighted combination, so no dense
``d_out x d_in`` matrix is formed; ``merge run --rank K`` truncates it by SVD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorashelf.errors import LorashelfError
from lorashelf.lora import combine
from lorashelf.merge.base import Expert, MergeMethod, check_experts, device_of
from lorashelf.merge.merged import Merged


@dataclass(frozen=True)
class TaskArithmeticConfig:
    scale: float = 1.0  # lambda: the weight of every task vector

    def __post_init__(self) -> None:
        if not self.scale == self.scale or abs(self.scale) == float("inf"):
            raise LorashelfError(f"task-arithmetic scale must be finite, got {self.scale}")


def task_arithmetic(
    experts: Sequence[Expert], config: TaskArithmeticConfig, progress: bool = False
) -> Merged:
    """scale * sum of the experts' deltas, exact as one concatenated LoRA"""
    names = check_experts(experts)
    device = device_of(experts, names)
    w = [config.scale] * len(experts)
    out = {n: combine([ex[n] for ex in experts], w, "output", device=device) for n in names}
    return Merged("task-arithmetic", config, len(experts), out)


TASK_ARITHMETIC = MergeMethod("task-arithmetic", TaskArithmeticConfig, task_arithmetic)
