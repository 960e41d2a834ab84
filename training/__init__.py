"""Fine-tuning: only the FPT parameters train (docs/architecture.md, "The pipeline"); data-parallel under torchrun.

The names below load on first use, so ``fpt_deploy.training.config`` (what the CLI reads to build its
options) imports without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvaluateConfig": "config",
    "TrainConfig": "config",
    "RunningSums": "loop",
    "TrainResult": "loop",
    "evaluate_checkpoint": "loop",
    "train": "loop",
    "multitask_configs": "multitask",
    "split_task_options": "multitask",
    "train_multitask": "multitask",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fpt_deploy.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fpt_deploy.training.{_EXPORTS[name]}"), name)
