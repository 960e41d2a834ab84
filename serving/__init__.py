"""Serving: runtimes, the dynamic batcher and the Open Inference Protocol server. Never imports torch."""

from serving.batcher import DynamicBatcher
from serving.config import PredictConfig, RuntimeConfig, ServeConfig
from serving.executor import InferenceRequest, InferenceResult, MixedBatchExecutor
from serving.model import LoadedTask, ServingModel
from serving.predict import PredictResult, predict
from serving.runtime import OrtRuntime, Runtime, TensorRTRuntime, create_runtime

__all__ = [
    "DynamicBatcher",
    "InferenceRequest",
    "InferenceResult",
    "LoadedTask",
    "MixedBatchExecutor",
    "OrtRuntime",
    "PredictConfig",
    "PredictResult",
    "Runtime",
    "RuntimeConfig",
    "ServeConfig",
    "ServingModel",
    "TensorRTRuntime",
    "create_app",
    "create_runtime",
    "predict",
    "serve",
]


def __getattr__(name: str):
    """The HTTP server (FastAPI, uvicorn) loads only when asked for: ``predict`` never needs it."""
    if name in ("create_app", "serve", "ServerState"):
        from serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
