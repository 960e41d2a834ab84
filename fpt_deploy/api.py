"""The Python API: one call per command of the CLI, taking the same config dataclasses.

    import fpt_deploy

    result = fpt_deploy.train(fpt_deploy.TrainConfig(task="bit-xor", backbone="tiny-bert", steps=50))
    fpt_deploy.export(fpt_deploy.ExportConfig(checkpoints=[result.checkpoint], repo="deploy"))
    labels = fpt_deploy.predict(fpt_deploy.PredictConfig(repo="deploy", task="bit-xor", input="x.npy")).labels

``fpt-deploy train`` calls ``train``, ``fpt-deploy predict`` calls ``predict``, and so on: the command
line only turns options into a config and prints the result (docs/api.md). ``fpt_deploy.export`` is the
export package itself, callable (``fpt_deploy/export/__init__.py``): a function of that name could not
live beside the package. Each call also takes the config's fields as keywords
(``fpt_deploy.train(task="bit-xor", steps=50)``). Heavy imports (torch, onnxruntime, the server) happen
inside the calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fpt_deploy.choices import config_from

if TYPE_CHECKING:
    from fpt_deploy.serving import PredictConfig, PredictResult, ServeConfig
    from fpt_deploy.training import EvaluateConfig, TrainConfig


def train(config: TrainConfig | Sequence[TrainConfig] | None = None, /, **fields: Any):
    """Train one task (a ``TrainConfig``) -> ``TrainResult``; several (a list) in one job sharing the body.

    A list trains every task against ONE frozen body in one job (``fpt-deploy train --tasks``) and
    returns one ``TrainResult`` per config, in order.
    """
    from fpt_deploy.training import TrainConfig, train_multitask

    if isinstance(config, Sequence):
        if fields:
            raise TypeError("pass a list of TrainConfig or one config's fields, not both")
        return train_multitask([config_from(TrainConfig, c, {}) for c in config])
    return train_multitask([config_from(TrainConfig, config, fields)])[0]


def evaluate(config: EvaluateConfig | None = None, /, **fields: Any) -> dict:
    """A checkpoint's held-out accuracy: ``{"task", "split", "examples", "loss", "accuracy"}``."""
    from fpt_deploy.training import EvaluateConfig, evaluate_checkpoint

    return evaluate_checkpoint(config_from(EvaluateConfig, config, fields))


def predict(config: PredictConfig | None = None, /, **fields: Any) -> PredictResult:
    """Offline batch inference of one task of a repository on the rows of a .npy file (no server)."""
    from fpt_deploy.serving import PredictConfig
    from fpt_deploy.serving.predict import predict as run_predict

    return run_predict(config_from(PredictConfig, config, fields))


def serve(config: ServeConfig | None = None, /, **fields: Any) -> None:
    """Serve every task of a repository over HTTP and gRPC until interrupted (blocks)."""
    from fpt_deploy.serving import ServeConfig
    from fpt_deploy.serving.server import serve as run_server

    run_server(config_from(ServeConfig, config, fields))
