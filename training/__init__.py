"""Fine-tuning: only the FPT parameters train (DESIGN.md, "The model"); data-parallel under torchrun."""

from fpt_deploy.training.config import TrainConfig
from fpt_deploy.training.loop import TrainResult, evaluate_checkpoint, train
from fpt_deploy.training.multitask import multitask_configs, split_task_options, train_multitask

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate_checkpoint",
    "multitask_configs",
    "split_task_options",
    "train",
    "train_multitask",
]
