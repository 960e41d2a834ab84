"""Triton's protocol extensions beside ``infer``: model repository, statistics, model configuration,
classification, and the page at ``/``.

    POST /v2/repository/index                       every task of the repository, with its state
    POST /v2/repository/models/{task}/load          open a task exported while the server runs
    POST /v2/repository/models/{task}/unload        drain its requests, then close it
    GET  /v2/models/stats, /v2/models/{task}/stats  Triton's statistics JSON (counts, durations)
    GET  /v2/models/{task}/config                   Triton's model configuration JSON
    GET  /                                          the page (``serving/static``)

Repository control itself (modes, states, the poller) is ``serving.repository``.
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.metrics import MODEL_VERSION
from fpt_deploy.serving.repository import control_of, request_parameters

from fpt_deploy.errors import FptDeployError, UnknownNameError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CLASSIFICATION = "classification"  # the output parameter Triton's classification extension reads
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics", "model_configuration"]


def status_of(error: Exception) -> int:
    """The HTTP status of an error raised while serving (404 for an unknown model, else its own or 500)."""
    if isinstance(error, UnknownNameError):
        return 404
    if isinstance(error, TimeoutError):  # an unload whose requests did not finish in time: retry later
        return 503
    return getattr(error, "status", 400 if isinstance(error, FptDeployError) else 500)


# -- model configuration and classification --------------------------------------------------------


def model_config(state, task) -> dict:
    """Triton's model configuration of ``task`` (``GET .../config``; gRPC parses the same dict)."""
    from fpt_deploy.serving.protocol import triton_dtype
    from fpt_deploy.serving.server import model_outputs

    def dims(shape: list[int]) -> list[int]:
        return list(shape[1:]) or [1]  # no batch dimension, as Triton's config has it

    outputs = []
    for out in model_outputs(task):
        entry = {"name": out["name"], "data_type": f"TYPE_{out['datatype']}", "dims": dims(out["shape"])}
        if len(out["shape"]) == 1:
            entry["reshape"] = {"shape": []}
        outputs.append(entry)
    backbone = state.model.backbone
    delay = getattr(state.batcher, "max_queue_delay", 0.0)
    return {
        "name": task.name,
        "platform": "fpt-deploy",
        "backend": "fpt-deploy",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": state.batcher.max_batch_size,
        "input": [
            {
                "name": task.input_name,
                "data_type": f"TYPE_{triton_dtype(task.input_dtype)}",
                "format": "FORMAT_NONE",
                "dims": list(task.example_shape),
            }
        ],
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": int(delay * 1e6)},
        "instance_group": [{"name": f"{task.name}_0", "kind": "KIND_CPU", "count": 1}],
        "parameters": {
            key: {"string_value": str(value)}
            for key, value in (
                ("labels", ",".join(task.labels)),
                ("backbone", backbone.name),
                ("backbone_fingerprint", backbone.fingerprint),
                ("runtime", state.model.runtime.name),
                ("vocab_size", task.vocab_size),  # > 0: the input holds token ids (the page's text box)
            )
        },
    }


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


def apply_classification(task, outputs: list[tuple], output_parameters: dict[str, dict]) -> list[tuple]:
    """``outputs`` [(name, array, binary)] with those asked for with ``classification`` as class strings."""
    result = []
    for name, array, binary in outputs:
        count = (output_parameters.get(name) or {}).get(CLASSIFICATION)
        if count is not None:
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise InvalidInputError(f"output {name!r}: classification must be a positive integer, got {count!r}")
            if array.dtype.kind != "f":
                raise InvalidInputError(
                    f"output {name!r} holds class indices; ask for classification on "
                    f"{task.output_name!r} or 'probabilities'"
                )
            array = classify(array, count, task.labels)
        result.append((name, array, binary))
    return result


# -- routes -----------------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def router(state) -> APIRouter:
    """The extension routes; the server includes them before its own ``/v2/models/{name}`` routes."""
    api = APIRouter()
    control = control_of(state)
    state.metrics.name_backbone(f"backbone-{state.model.backbone.fingerprint[:16]}")

    async def in_thread(fn, *args):
        """Run a blocking call (opening sessions, draining a task) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def json_body(request: Request) -> dict:
        """A small JSON object body, bounded and counted as ``infer``'s are (``http_limits``)."""
        from fpt_deploy.serving.http_limits import read_json_body

        return await read_json_body(request, state.budget, state.json_limits)

    async def guarded(fn):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001  (every failure answers {"error": ...})
            status = status_of(e)
            if status >= 500:
                log.exception("repository operation failed")
            return _error(status, str(e))

    @api.post("/v2/repository/index")
    async def repository_index(request: Request):
        async def run():
            ready = (await json_body(request)).get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInputError(f"'ready' must be true or false, got {ready!r}")
            return JSONResponse(await in_thread(control.index, ready))

        return await guarded(run)

    @api.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request):
        async def run():
            parameters = request_parameters(await json_body(request), "load")
            await in_thread(control.load, name, parameters)
            return Response(status_code=200)

        return await guarded(run)

    @api.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request):
        async def run():
            parameters = request_parameters(await json_body(request), "unload")
            await in_thread(control.unload, name, parameters)
            return Response(status_code=200)

        return await guarded(run)

    def stats_of(name: str | None, version: str | None) -> JSONResponse:
        tasks = list(state.model.tasks)
        if version not in (None, "", MODEL_VERSION):
            return _error(404, f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
        entries = state.metrics.statistics(tasks)
        if name is not None:
            entries = [e for e in entries if e["name"] == name]
            if not entries:
                return _error(404, f"model {name!r} is not served here; models: {', '.join(tasks)}")
        return JSONResponse({"model_stats": entries})

    @api.get("/v2/models/stats")
    async def all_stats():
        return stats_of(None, None)

    @api.get("/v2/models/{name}/stats")
    @api.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None):
        return stats_of(name, version)

    @api.get("/v2/models/{name}/config")
    @api.get("/v2/models/{name}/versions/{version}/config")
    async def config(name: str, version: str = MODEL_VERSION):
        try:
            task = state.model.task(name)
        except UnknownNameError as e:
            return _error(404, str(e))
        if version != MODEL_VERSION:
            return _error(404, f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
        return JSONResponse(model_config(state, task))

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/static/{file}", include_in_schema=False)
    async def static(file: str):
        if file not in _STATIC_FILES:  # the page's own files only: no path ever reaches the file system
            return _error(404, f"no static file {file!r}")
        return FileResponse(STATIC / file, media_type=_STATIC_FILES[file])

    return api


_STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
