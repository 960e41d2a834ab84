"""The inference service: what answering a request means, whichever protocol carried it.

HTTP (``server.py``) and gRPC (``grpc_server.py``) are thin adapters over one ``InferenceService``:
each turns its transport's bytes into validated input arrays (``protocol.py``) and the service's
answers back into its own messages. Everything in between is here, written once:

- resolving a task and its version (``task``; every model has the one version ``MODEL_VERSION``);
- the task's own input checks, then the batcher (``submit``);
- selecting outputs and Triton's classification extension (``outputs``);
- model metadata and Triton's model configuration (``metadata``, ``model_config``);
- the status of each error (``status_of``: one table; gRPC maps these statuses to its codes).

The pipeline under it (model, runtime, batcher, executor, metrics) is built in one place from a
``RuntimeConfig`` (``build_pipeline``), for the server, ``fpt-deploy predict``, tests and bench alike.
This module imports neither FastAPI nor gRPC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from fpt_deploy.serving.batcher import DynamicBatcher
from fpt_deploy.serving.config import RuntimeConfig, ServeConfig
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.executor import InferenceResult, MixedBatchExecutor
from fpt_deploy.serving.metrics import UNKNOWN_MODEL, ServingMetrics
from fpt_deploy.serving.model import LoadedTask, ServingModel
from fpt_deploy.serving.protocol import MODEL_VERSION, InferRequest, InputContract, triton_dtype

from fpt_deploy.errors import FptDeployError, UnknownNameError

log = logging.getLogger(__name__)

SERVER_NAME = "fpt-deploy"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics", "model_configuration"]
PROBABILITIES, LABELS = "probabilities", "labels"
CLASSIFICATION = "classification"  # the output parameter Triton's classification extension reads

# The status of each kind of error; the first matching row wins. An error not listed answers its own
# ``status`` attribute (serving/errors.py), 400 for any other FptDeployError, else 500.
_STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownNameError, 404),  # no such model or version
    (TimeoutError, 409),  # an unload whose requests did not finish in time: the task serves on, retry later
)


def status_of(error: BaseException) -> int:
    """The HTTP status an error raised while serving answers with (gRPC maps it to its code)."""
    for kind, status in _STATUSES:
        if isinstance(error, kind):
            return status
    return getattr(error, "status", 400 if isinstance(error, FptDeployError) else 500)


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fpt-deploy")
    except PackageNotFoundError:
        return "0"


def check_version(name: str, version: str | None) -> None:
    """``UnknownNameError`` (404) unless ``version`` is the one every model has (or none was named)."""
    if version not in (None, "", MODEL_VERSION):
        raise UnknownNameError(f"model {name!r} has only version {MODEL_VERSION}, not {version[:40]!r}")


def model_outputs(task: LoadedTask) -> list[dict]:
    """The outputs a model offers: its logits, their softmax, and the argmax labels."""
    shape = [-1, *task.logits_shape]
    return [
        {"name": task.output_name, "datatype": "FP32", "shape": shape},
        {"name": PROBABILITIES, "datatype": "FP32", "shape": shape},
        {"name": LABELS, "datatype": "INT64", "shape": shape[:-1]},
    ]


def classify(scores: np.ndarray, class_count: int, labels: list[str]) -> np.ndarray:
    """Triton's classification output: the top ``class_count`` of the last axis as b"score:index:label".

    ``scores`` (n, ..., C) -> (n, ..., class_count) of bytes, highest first; the label is left out
    when the model has none for that index, as Triton does.
    """
    k = min(class_count, scores.shape[-1])
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(scores, top, axis=-1)
    out = np.empty(top.shape, dtype=object)
    for pos in np.ndindex(top.shape):
        i = int(top[pos])
        text = f"{float(values[pos]):f}:{i}"
        out[pos] = (f"{text}:{labels[i]}" if i < len(labels) else text).encode()
    return out


# -- the pipeline ------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """A served model and the batcher (with its executor) in front of its runtime."""

    model: ServingModel
    batcher: DynamicBatcher
    metrics: ServingMetrics | None

    def close(self, timeout: float | None = None) -> None:
        self.batcher.close(timeout)
        self.model.close()


def build_pipeline(
    config: RuntimeConfig,
    tasks: list[str] | None = None,
    *,
    metrics: ServingMetrics | None = None,
    wrap: Callable[[MixedBatchExecutor], Callable] | None = None,
) -> Pipeline:
    """Model, runtime, executor and batcher of ``config``: the one place their settings are read.

    ``tasks`` as ``ServingModel`` takes them (None: every task). A ``ServeConfig`` also brings its
    queue-rows bound and resident-task cap. ``wrap`` replaces the executor by a callable around it
    (tests hold batches with it).
    """
    serve = config if isinstance(config, ServeConfig) else None
    model = ServingModel(config, tasks, max_resident_tasks=serve.max_resident_tasks if serve else None)
    try:
        if metrics is not None:
            metrics.resident_tasks.set_function(lambda: model.resident_tasks)
        executor = MixedBatchExecutor(model.runtime, config.pad_tolerance, metrics, page_in=model.page_in)
        batcher = DynamicBatcher(
            executor if wrap is None else wrap(executor),
            config.max_batch_size,
            config.max_queue_delay_ms,
            config.max_queue_size,
            metrics,
            max_queue_rows=serve.max_queue_rows if serve else None,
        )
    except BaseException:
        model.close()
        raise
    return Pipeline(model, batcher, metrics)


# -- the service -------------------------------------------------------------------------------------


class InferenceService:
    """One model, its batcher and metrics, answering requests of any protocol; ``ready`` until closed."""

    def __init__(self, pipeline: Pipeline) -> None:
        assert pipeline.metrics is not None, "a served pipeline counts: build_pipeline(..., metrics=ServingMetrics())"
        self.pipeline = pipeline
        self.model, self.batcher, self.metrics = pipeline.model, pipeline.batcher, pipeline.metrics
        self.metrics.name_backbone(f"backbone-{self.model.backbone.fingerprint[:16]}")
        self.ready = True

    @classmethod
    def of(cls, config: ServeConfig, tasks: list[str] | None = None) -> InferenceService:
        return cls(build_pipeline(config, tasks, metrics=ServingMetrics()))

    @property
    def max_batch_size(self) -> int:
        return self.batcher.max_batch_size

    # -- resolving ------------------------------------------------------------------------------------

    def task(self, name: str, version: str | None = None) -> LoadedTask:
        """The served task ``name`` at ``version``; ``UnknownNameError`` (404) naming what is served."""
        task = self.model.task(name)
        check_version(name, version)
        return task

    def is_ready(self, name: str, version: str | None = None) -> bool:
        return self.ready and self.model.is_ready(name) and version in (None, "", MODEL_VERSION)

    def label(self, name: str) -> str:
        """The metrics label of requests for ``name``: bounded to the served tasks."""
        return name if name in self.model.tasks else UNKNOWN_MODEL

    def contract(self, task: LoadedTask) -> InputContract:
        return InputContract.of(task, self.batcher.max_batch_size)

    def contracts(self) -> list[InputContract]:
        """The contract of every task the repository lists on the served body (loaded or not)."""
        fingerprint = self.model.backbone.fingerprint
        found = {c.model: c for c in map(self.contract, self.model.tasks.values())}
        for name, art in self.model.repository.tasks.items():
            if name not in found and art.fingerprint == fingerprint:
                found[name] = InputContract.of_artifact(art, self.batcher.max_batch_size)
        return list(found.values())

    # -- inference ------------------------------------------------------------------------------------

    def submit(self, task: LoadedTask, inputs: dict[str, np.ndarray]) -> Future:
        """Check ``inputs`` (validated by the protocol) against the task, and queue them in the batcher."""
        (name, array), *_ = inputs.items()
        task.check_input(name, array, self.batcher.max_batch_size)
        return self.batcher.submit(task, array)

    def outputs(
        self, task: LoadedTask, result: InferenceResult, request: InferRequest
    ) -> list[tuple[str, np.ndarray, bool]]:
        """[(name, array, binary)] of the outputs ``request`` asks for (all, by default), classified if asked."""
        arrays = {task.output_name: result.logits, PROBABILITIES: result.probabilities, LABELS: result.labels}
        names = list(arrays) if request.outputs is None else list(request.outputs)
        unknown = [n for n in names if n not in arrays]
        if unknown:
            shown = ", ".join(repr(n[:40]) for n in unknown[:4])
            raise InvalidInputError(f"model {task.name!r} has no output {shown}; its outputs: {', '.join(arrays)}")
        selected = []
        for name in names:
            array = arrays[name]
            count = (request.output_parameters.get(name) or {}).get(CLASSIFICATION)
            if count is not None:
                array = self._classified(task, name, array, count)
            selected.append((name, array, request.wants_binary(name)))
        return selected

    @staticmethod
    def _classified(task: LoadedTask, name: str, array: np.ndarray, count) -> np.ndarray:
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidInputError(f"output {name!r}: classification must be a positive integer, got {count!r}")
        if array.dtype.kind != "f":
            raise InvalidInputError(
                f"output {name!r} holds class indices; "
                f"ask for classification on {task.output_name!r} or 'probabilities'"
            )
        return classify(array, count, task.labels)

    def failed(self, name: str, error: BaseException, seconds: float | None = None) -> int:
        """Count a failed request for ``name``; its status (``status_of``)."""
        status = status_of(error)
        self.metrics.observe_request(self.label(name), status, seconds)
        return status

    def succeeded(self, name: str, seconds: float) -> None:
        self.metrics.observe_request(self.label(name), 200, seconds)

    # -- descriptions ---------------------------------------------------------------------------------

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    def metadata(self, task: LoadedTask) -> dict:
        """KServe v2 model metadata (gRPC sends the same fields but ``parameters``)."""
        return {
            "name": task.name,
            "versions": [MODEL_VERSION],
            "platform": SERVER_NAME,
            "inputs": [
                {
                    "name": task.input_name,
                    "datatype": triton_dtype(task.input_dtype),
                    "shape": [-1, *task.example_shape],
                }
            ],
            "outputs": model_outputs(task),
            "parameters": {
                "labels": task.labels,
                "backbone": self.model.backbone.name,
                "backbone_fingerprint": self.model.backbone.fingerprint,
                "backbone_variant": self.model.variant,
                "runtime": self.model.runtime.name,
                "max_batch_size": self.batcher.max_batch_size,
            },
        }

    def model_config(self, task: LoadedTask) -> dict:
        """Triton's model configuration of ``task`` (HTTP ``GET .../config``; gRPC parses the same dict)."""

        def dims(shape: list[int]) -> list[int]:
            return list(shape[1:]) or [1]  # no batch dimension, as Triton's config has it

        outputs = []
        for out in model_outputs(task):
            entry = {"name": out["name"], "data_type": f"TYPE_{out['datatype']}", "dims": dims(out["shape"])}
            if len(out["shape"]) == 1:
                entry["reshape"] = {"shape": []}
            outputs.append(entry)
        backbone = self.model.backbone
        return {
            "name": task.name,
            "platform": SERVER_NAME,
            "backend": SERVER_NAME,
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.batcher.max_batch_size,
            "input": [
                {
                    "name": task.input_name,
                    "data_type": f"TYPE_{triton_dtype(task.input_dtype)}",
                    "format": "FORMAT_NONE",
                    "dims": list(task.example_shape),
                }
            ],
            "output": outputs,
            "dynamic_batching": {"max_queue_delay_microseconds": int(self.batcher.max_queue_delay * 1e6)},
            "instance_group": [{"name": f"{task.name}_0", "kind": "KIND_CPU", "count": 1}],
            "parameters": {
                key: {"string_value": str(value)}
                for key, value in (
                    ("labels", ",".join(task.labels)),
                    ("backbone", backbone.name),
                    ("backbone_fingerprint", backbone.fingerprint),
                    ("runtime", self.model.runtime.name),
                    ("vocab_size", task.vocab_size),  # > 0: the input holds token ids (the page's text box)
                )
            },
        }

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict]:
        """Triton's statistics entries: every task's, or ``name``'s (404 when it is not served)."""
        tasks = list(self.model.tasks)
        check_version(name or "", version)
        entries = self.metrics.statistics(tasks)
        if name is not None:
            entries = [e for e in entries if e["name"] == name]
            if not entries:
                raise UnknownNameError(f"model {name!r} is not served here; models: {', '.join(tasks)}")
        return entries

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones (within ``timeout``), then free the runtime."""
        self.ready = False
        self.pipeline.close(timeout)
