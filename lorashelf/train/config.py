"""The hyperparameters of one LoRA training run, saved beside every expert it makes.

Defaults follow the small-model setting of Ostapenko et al. 2024 (arXiv 2405.11157):
rank-4 LoRA on the attention projections, AdamW at 1e-3 with a short warm-up. One
choice matters beyond the single expert: ``init_seed`` fixes the random LoRA ``A``
initialisation and is *shared* by every expert of a library, so that two experts'
parameters differ because of their data, not their seeds; parameter-similarity
clustering (MBC) and Arrow prototypes rely on that. ``seed`` only orders the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorashelf.config import to_dict
from lorashelf.errors import LorashelfError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SPLITS = ("train", "valid", "test", "all")


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run. ``alpha=None`` means ``2 * rank`` (a LoRA scale of 2).

    ``steps`` or ``epochs`` (exactly one) sets the length; ``warmup`` is a fraction of
    the steps. ``dtype`` is the autocast dtype of the forward pass ("auto": none for a
    base already loaded in bf16/fp16, else bf16 where the device computes it natively,
    fp16 on older GPUs; "fp32": no autocast); LoRA weights and the optimizer state
    always stay fp32. ``split_seed`` picks the train/valid/test cut
    and must match the one evaluation uses, or test examples leak into training.
    ``bucket`` groups examples of similar length into a batch (less padding).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup: float = 0.06
    steps: int | None = 200
    epochs: float | None = None
    batch_size: int = 8
    max_length: int = 512
    max_valid: int = 200  # validation examples per task (the loss is a check, not a sweep)
    max_grad_norm: float = 1.0
    seed: int = 0
    init_seed: int = 0
    split_seed: int = 0
    train_on: str = "train"
    dtype: str = "auto"
    chat: bool = False
    bucket: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (bool(self.target_modules), "target_modules is empty; e.g. q_proj,v_proj"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (0.0 <= self.warmup < 1.0, "warmup is a fraction of the steps in [0, 1)"),
            ((self.steps is None) != (self.epochs is None), "set exactly one of steps, epochs"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (self.max_valid >= 0, f"max_valid must be >= 0, got {self.max_valid}"),
            (self.train_on in SPLITS, f"train_on must be one of {SPLITS}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LorashelfError(f"bad training config: {msg}")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise LorashelfError("target_modules: use all-linear alone, not with module names")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def peft_targets(self) -> str | list[str]:
        """``target_modules`` as PEFT's LoraConfig takes it."""
        return "all-linear" if self.target_modules == ("all-linear",) else list(self.target_modules)

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * n_train / self.batch_size))

    def to_card(self) -> dict[str, Any]:
        """The JSON recorded in an expert's card, with ``alpha`` resolved."""
        return {**to_dict(self), "alpha": self.lora_alpha}


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ("q_proj", "v_proj"); ``"attention"`` and ``"all-linear"`` too."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("attention",):
        return ATTENTION
    if not names:
        raise LorashelfError("--target-modules is empty; pass e.g. q_proj,v_proj or all-linear")
    return names
