"""fpt-deploy: frozen pretrained transformers, trained cheaply per task and served from one backbone.

The Python API (docs/api.md) is the command line's own calls, taking the same config dataclasses::

    import fpt_deploy

    result = fpt_deploy.train(task="bit-xor", backbone="tiny-bert", steps=50)
    fpt_deploy.export(checkpoints=[result.checkpoint], repo="deploy")
    with fpt_deploy.Client("localhost:8000") as client:   # `fpt-deploy serve --repo deploy` running
        client.infer("bit-xor", x)

Every name loads on first use: ``import fpt_deploy`` imports neither torch nor onnxruntime.
"""

import importlib

from fpt_deploy.lazy import lazy_exports

_EXPORTS = {
    "train": "api",
    "evaluate": "api",
    "predict": "api",
    "serve": "api",
    "Client": "client",
    "ModelOptions": "model_options",
    "TrainConfig": "training.config",
    "EvaluateConfig": "training.config",
    "ExportConfig": "export.config",
    "PredictConfig": "serving.config",
    "ServeConfig": "serving.config",
}
__all__ = sorted([*_EXPORTS, "export"])
_exported = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str):
    if name == "export":  # the export package, callable as the API's export (fpt_deploy/export/__init__.py)
        return importlib.import_module("fpt_deploy.export")
    return _exported(name)
