"""Serving: runtimes, the dynamic batcher and the Open Inference Protocol server. Never imports torch."""

from fpt_deploy.serving.batcher import DynamicBatcher
from fpt_deploy.serving.config import PredictConfig, RuntimeConfig, ServeConfig
from fpt_deploy.serving.executor import InferenceRequest, InferenceResult, MixedBatchExecutor
from fpt_deploy.serving.model import LoadedTask, ServingModel
from fpt_deploy.serving.predict import PredictResult, predict
from fpt_deploy.serving.runtimes import Runtime, create_runtime, register_runtime, runtime_names
from fpt_deploy.serving.service import InferenceService, Pipeline, build_pipeline

__all__ = [
    "DynamicBatcher",
    "InferenceService",
    "InferenceRequest",
    "InferenceResult",
    "LoadedTask",
    "MixedBatchExecutor",
    "Pipeline",
    "PredictConfig",
    "PredictResult",
    "Runtime",
    "RuntimeConfig",
    "ServeConfig",
    "ServingModel",
    "build_pipeline",
    "create_app",
    "create_runtime",
    "predict",
    "register_runtime",
    "runtime_names",
    "serve",
]


def __getattr__(name: str):
    """The HTTP server (FastAPI, uvicorn) loads only when asked for: ``predict`` never needs it."""
    if name in ("create_app", "serve", "ServerState"):
        from fpt_deploy.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
