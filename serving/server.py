"""The HTTP server: Open Inference Protocol (KServe v2) endpoints, as Triton serves them.

    GET  /v2/health/live, /v2/health/ready, /v2            server health and metadata
    GET  /v2/models/{task}[/versions/{v}][/ready]         model metadata and readiness
    POST /v2/models/{task}[/versions/{v}]/infer           JSON tensors and the binary extension
    GET  /metrics                                         Prometheus

The request path is split into hooks (decode the request, predict on a batch, encode the response):
decoding and encoding run on the event loop, prediction in the batcher's worker thread. Errors get the
protocol's ``{"error": message}`` body: 400 for bad input, 404 for an unknown model, 413 for a body
over the limit, 503 for a full queue or a server shutting down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fpt_deploy.serving.batcher import DynamicBatcher
from fpt_deploy.serving.config import ServeConfig
from fpt_deploy.serving.errors import InvalidInputError, RequestTooLargeError
from fpt_deploy.serving.executor import InferenceResult, MixedBatchExecutor
from fpt_deploy.serving.metrics import ServingMetrics
from fpt_deploy.serving.model import LoadedTask, ServingModel
from fpt_deploy.serving.protocol import HEADER_LENGTH, decode_request, encode_response, triton_dtype
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fpt_deploy.errors import FptDeployError, UnknownNameError

log = logging.getLogger(__name__)

SERVER_NAME = "fpt-deploy"
# The batcher's worker re-takes the GIL after every ONNX Runtime call; with the event loop busy in
# Python it waits up to this interval each time while the backbone's cores sit idle. CPython's default
# (5 ms) cost the int8 server at concurrency 32 about 15% of its worker's time in GIL waits (its input
# heads stage took 13-17% of the wall time instead of ~2%); 0.1 ms measured 4% (bench/serve_load.py).
GIL_SWITCH_INTERVAL_S = 1e-4
MODEL_VERSION = "1"
PROBABILITIES, LABELS = "probabilities", "labels"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fpt-deploy")
    except PackageNotFoundError:
        return "0"


def model_outputs(task: LoadedTask) -> list[dict]:
    """The outputs a model offers: its logits, their softmax, and the argmax labels."""
    shape = [-1, *task.logits_shape]
    return [
        {"name": task.output_name, "datatype": "FP32", "shape": shape},
        {"name": PROBABILITIES, "datatype": "FP32", "shape": shape},
        {"name": LABELS, "datatype": "INT64", "shape": shape[:-1]},
    ]


def _select_outputs(task: LoadedTask, result: InferenceResult, request) -> list[tuple[str, np.ndarray, bool]]:
    arrays = {task.output_name: result.logits, PROBABILITIES: result.probabilities, LABELS: result.labels}
    names = list(arrays) if request.outputs is None else list(request.outputs)
    unknown = [n for n in names if n not in arrays]
    if unknown:
        raise InvalidInputError(
            f"model {task.name!r} has no output {', '.join(map(repr, unknown))}; its outputs: {', '.join(arrays)}"
        )
    return [(n, arrays[n], request.wants_binary(n)) for n in names]


class ServerState:
    """What the app serves: the loaded model, its batcher, metrics, and whether it is shutting down."""

    def __init__(
        self, model: ServingModel, batcher: DynamicBatcher, metrics: ServingMetrics, max_body_bytes: int
    ) -> None:
        self.model, self.batcher, self.metrics = model, batcher, metrics
        self.max_body_bytes = max_body_bytes
        self.ready = True

    @classmethod
    def load(cls, config: ServeConfig) -> ServerState:
        model = ServingModel(config)
        metrics = ServingMetrics()
        executor = MixedBatchExecutor(model.runtime, config.pad_tolerance, metrics)
        batcher = DynamicBatcher(
            executor, config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size, metrics
        )
        return cls(model, batcher, metrics, config.max_body_bytes)

    def close(self, timeout: float | None = None) -> None:
        self.ready = False
        self.batcher.close(timeout)
        self.model.close()


def create_app(state: ServerState):
    """The FastAPI application over ``state``; closing the app drains the batcher."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting connections and finished in-flight requests (graceful shutdown);
        # now finish whatever the batcher still holds and free the runtime.
        await asyncio.get_running_loop().run_in_executor(None, state.close, 60.0)
        log.info("shut down after finishing in-flight requests")

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": _version(), "extensions": ["binary_tensor_data"]}

    def lookup(name: str) -> LoadedTask | JSONResponse:
        try:
            return state.model.task(name)
        except UnknownNameError as e:
            return error(404, str(e))

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = MODEL_VERSION):
        task = lookup(name)
        if isinstance(task, JSONResponse):
            return task
        if version != MODEL_VERSION:
            return error(404, f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
        backbone = state.model.backbone
        return {
            "name": task.name,
            "versions": [MODEL_VERSION],
            "platform": "fpt-deploy",
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
                "backbone": backbone.name,
                "backbone_fingerprint": backbone.fingerprint,
                "backbone_variant": state.model.variant,
                "runtime": state.model.runtime.name,
                "max_batch_size": state.batcher.max_batch_size,
            },
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = MODEL_VERSION):
        task = lookup(name)
        if isinstance(task, JSONResponse):
            return task
        return Response(status_code=200 if state.ready and version == MODEL_VERSION else 404)

    async def read_body(request: Request) -> bytearray:
        limit = state.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLargeError(f"the request body has {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLargeError(f"the request body exceeds the limit of {limit} bytes")
        return body

    async def infer(request: Request):
        t0 = time.perf_counter()
        name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
        label = name if name in state.model.tasks else "<unknown>"  # bounded label set
        try:
            task = state.model.task(name)
            if version != MODEL_VERSION:
                raise UnknownNameError(f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
            body = await read_body(request)
            decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
            if len(decoded.inputs) != 1:
                raise InvalidInputError(
                    f"model {name!r} takes one input, {task.input_name!r} "
                    f"({task.describe_input()}); got {len(decoded.inputs)}: "
                    f"{', '.join(decoded.inputs)}"
                )
            input_name, array = next(iter(decoded.inputs.items()))
            task.check_input(input_name, array, state.batcher.max_batch_size)
            result = await asyncio.wrap_future(state.batcher.submit(task, array))
            outputs = _select_outputs(task, result, decoded)
            payload, header_length = encode_response(task.name, decoded.id, outputs, MODEL_VERSION)
        except FptDeployError as e:
            status = 404 if isinstance(e, UnknownNameError) else getattr(e, "status", 500)
            state.metrics.observe_request(label, status)
            return error(status, str(e))
        except Exception as e:  # noqa: BLE001  (an internal failure answers 500; the server stays up)
            log.exception("inference for %s failed", name)
            state.metrics.observe_request(label, 500)
            return error(500, f"internal error: {e}")
        state.metrics.observe_request(label, 200, time.perf_counter() - t0)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    # The hot path is a plain Starlette route: it parses its own input, so FastAPI's parameter and
    # dependency machinery would only add to the event loop's ~220 us of CPU a request (~20 us measured).
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.add_route(path, infer, methods=["POST"])

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(config: ServeConfig) -> None:
    """Load the repository, then serve it until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    state = ServerState.load(config)
    app = create_app(state)
    log.info(
        "serving %d model(s) (%s) on http://%s:%d with %s",
        len(state.model.tasks),
        ", ".join(state.model.tasks),
        config.host,
        config.port,
        state.model.runtime.name,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=config.graceful_timeout_s,
            lifespan="on",
        )
    )
    try:
        server.run()
    finally:
        if state.ready:  # the lifespan shutdown did not run (startup failed, say)
            state.close(config.graceful_timeout_s)
