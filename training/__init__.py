"""Fine-tuning: only the FPT parameters train (docs/architecture.md, "The pipeline"); data-parallel under torchrun.

The names below load on first use, so ``fpt_deploy.training.config`` (what the CLI reads to build its
options) imports without torch.
"""

from __future__ import annotations

from fpt_deploy.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
