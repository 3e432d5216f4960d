"""Train LoRA experts: one per task or one on a union of tasks, locally or with Ray."""

from lorashelf.train.config import TrainConfig
from lorashelf.train.trainer import TrainResult, mean_target_nll, train_expert

__all__ = ["TrainConfig", "TrainResult", "mean_target_nll", "train_expert"]
