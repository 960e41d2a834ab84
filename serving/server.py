"""The HTTP server: Open Inference Protocol (KServe v2) endpoints, as Triton serves them.

    GET  /v2/health/live, /v2/health/ready, /v2            server health and metadata
    GET  /v2/models/{task}[/versions/{v}][/ready]         model metadata and readiness
    POST /v2/models/{task}[/versions/{v}]/infer           JSON tensors and the binary extension
    GET  /metrics                                         Prometheus
    GET  /openapi.json                                    this surface, described (serving/openapi.py)

The request path is split into hooks (decode the request, predict on a batch, encode the response).
Bad input cannot hurt the server or its other clients; each limit answers with its own status and a
short ``{"error": message}`` naming the field, and logs one warning line with the request id:

    400  malformed JSON or binary data, inputs that do not match the model (protocol.py), JSON nested
         deeper than ``json_max_depth`` or with a number longer than ``json_max_number_chars``
    404  unknown model or version
    408  headers not complete within ``header_timeout_s``, or a body idle for ``body_timeout_s`` or
         slower than ``min_body_rate`` bytes/s over ``body_timeout_s``
    413  a body over ``max_body_bytes``, or over the largest valid request for this model (its
         shape times ``max_batch_size``): refused from Content-Length before any byte is read
    431  request line and headers over ``max_header_bytes``
    503  the batcher holds ``max_queue_size`` requests or ``max_queue_rows`` rows (as Triton answers
         a full queue), the server holds ``max_buffered_bytes`` of request bodies, or it is shutting down

Header and connection limits live in http_limits.py. Decoding of a large body runs in a thread pool,
so health checks and other clients stay fast while it is parsed; small ones decode on the loop,
where a thread hop would cost more than the work. A client that disconnects is counted in
``fpt_client_disconnects_total`` and logged as one line; it is not a server error. Server errors
answer 500 with the request id only, and log the traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fpt_deploy.serving import extensions
from fpt_deploy.serving.batcher import DynamicBatcher
from fpt_deploy.serving.config import ServeConfig
from fpt_deploy.serving.errors import (
    InvalidInputError,
    QueueFullError,
)
from fpt_deploy.serving.executor import InferenceResult, MixedBatchExecutor
from fpt_deploy.serving.grpc_server import start_grpc_server
from fpt_deploy.serving.http_limits import (
    CLOSED_SCOPE_KEY,
    BodyBudget,
    ConnectionLimits,
    limited_protocol,
    read_body,
)
from fpt_deploy.serving.metrics import ServingMetrics, configure_server_logs
from fpt_deploy.serving.model import LoadedTask, ServingModel
from fpt_deploy.serving.openapi import CORE_PATHS, build_document, with_examples
from fpt_deploy.serving.protocol import (
    HEADER_LENGTH,
    InferRequest,
    InputContract,
    JsonLimits,
    decode_request,
    encode_response,
    triton_dtype,
)
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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
# Bodies up to this size decode on the event loop (a thread hop costs more); larger ones in a pool.
INLINE_DECODE_BYTES = 64 << 10
DECODE_THREADS = 2
REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
        shown = ", ".join(repr(n[:40]) for n in unknown[:4])
        raise InvalidInputError(f"model {task.name!r} has no output {shown}; its outputs: {', '.join(arrays)}")
    return [(n, arrays[n], request.wants_binary(n)) for n in names]


class LimitMetrics:
    """What the limits refused or closed, beside ``ServingMetrics`` on its registry."""

    def __init__(self, registry) -> None:
        self.disconnects = Counter(
            "fpt_client_disconnects", "Requests whose client went away before the answer", registry=registry
        )
        self.closed = Counter(
            "fpt_connections_closed",
            "Connections the server closed: header/body timeouts, oversized headers, shutdown",
            ["reason"],
            registry=registry,
        )
        self.buffered = Gauge("fpt_request_bytes_buffered", "Request body bytes held by the server", registry=registry)


class ServerState:
    """What the app serves: the loaded model, its batcher, metrics, limits, and whether it is shutting down."""

    def __init__(
        self, model: ServingModel, batcher: DynamicBatcher, metrics: ServingMetrics, config: ServeConfig
    ) -> None:
        self.model, self.batcher, self.metrics, self.config = model, batcher, metrics, config
        self.limit_metrics = LimitMetrics(metrics.registry)
        self.budget = BodyBudget(config.max_buffered_bytes, self.limit_metrics.buffered)
        self.json_limits = JsonLimits(max_depth=config.json_max_depth, max_number_chars=config.json_max_number_chars)
        self.decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fpt-decode")
        self.ready = True

    @classmethod
    def load(cls, config: ServeConfig) -> ServerState:
        model = ServingModel(  # explicit mode: --load-model's only
            config, extensions.startup_tasks(config), max_resident_tasks=config.max_resident_tasks
        )
        metrics = ServingMetrics()
        metrics.resident_tasks.set_function(lambda: model.resident_tasks)
        executor = MixedBatchExecutor(model.runtime, config.pad_tolerance, metrics, page_in=model.page_in)
        batcher = DynamicBatcher(
            executor,
            config.max_batch_size,
            config.max_queue_delay_ms,
            config.max_queue_size,
            metrics,
            max_queue_rows=config.max_queue_rows,
        )
        return cls(model, batcher, metrics, config)

    def contract(self, task: LoadedTask) -> InputContract:
        return InputContract.of(task, self.batcher.max_batch_size)

    def body_limit(self, contract: InputContract | None) -> int:
        """The largest body accepted: the server's limit, or less when no valid request could be larger."""
        limit = self.config.max_body_bytes
        return limit if contract is None else min(limit, contract.max_body_bytes(self.json_limits))

    def close(self, timeout: float | None = None) -> None:
        self.ready = False
        self.batcher.close(timeout)
        self.model.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def _decode(
    body: bytearray, header_length: str | None, task: LoadedTask, contract: InputContract, limits: JsonLimits
) -> InferRequest:
    """The validated request: the protocol's checks, then the task's own (value ranges, padding)."""
    decoded = decode_request(body, header_length, contract, limits)
    for name, array in decoded.inputs.items():
        task.check_input(name, array, contract.max_rows)
    return decoded


def create_app(state: ServerState, routers: Sequence[APIRouter] = ()):
    """The FastAPI application over ``state``; closing the app drains the batcher.

    ``routers`` (extensions: repository, statistics, ...) are included first, so their fixed paths
    such as ``/v2/models/stats`` win over ``/v2/models/{name}``. Their routes are described in
    /openapi.json from their FastAPI signatures, or by entries they add to ``app.state.openapi_paths``.
    Extensions that read a body use ``read_body`` (bounded, counted in the budget) and
    ``protocol.parse_json`` (depth and number limits), as ``infer`` does.
    """

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting connections and finished in-flight requests (graceful shutdown);
        # now finish whatever the batcher still holds and free the runtime.
        await asyncio.get_running_loop().run_in_executor(None, state.close, 60.0)
        log.info("shut down after finishing in-flight requests")

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.openapi_paths = dict(CORE_PATHS)
    for extension in routers:
        app.include_router(extension)
    app.include_router(extensions.router(state))  # before /v2/models/{name}: .../stats and .../config win
    request_ids = itertools.count(1)

    def request_id(request: Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER)
        if given and _CLIENT_REQUEST_ID.fullmatch(given):
            return given
        return f"r{next(request_ids)}"

    def error(status: int, message: str, rid: str | None = None, close: bool = False) -> JSONResponse:
        headers = {REQUEST_ID_HEADER: rid} if rid else {}
        if close:  # the body was not read: don't let the client send the rest of it on this connection
            headers["Connection"] = "close"
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors()[:4])
        return JSONResponse({"error": problems}, status_code=400)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": _version(), "extensions": extensions.EXTENSIONS}

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
            return error(404, f"model {name!r} has only version {MODEL_VERSION}, not {version[:40]!r}")
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

    async def infer(request: Request):
        t0 = time.perf_counter()
        rid = request_id(request)
        name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
        label = name if name in state.model.tasks else "<unknown>"  # bounded label set
        reserved, body_read = 0, False
        try:
            task = state.model.task(name)
            if version != MODEL_VERSION:
                raise UnknownNameError(f"model {name!r} has only version {MODEL_VERSION}, not {version[:40]!r}")
            contract = state.contract(task)
            if state.batcher.is_full():  # refused before its body is read, as it would be after
                raise QueueFullError(f"the queue is full ({state.batcher.queued} requests waiting); retry later")
            try:
                body, reserved = await read_body(request, state.body_limit(contract), state.budget)
            except BaseException as e:
                reserved = getattr(e, "reserved", 0)
                raise
            body_read = True
            args = (body, request.headers.get(HEADER_LENGTH), task, contract, state.json_limits)
            if len(body) <= INLINE_DECODE_BYTES:
                decoded = _decode(*args)
            else:
                decoded = await asyncio.get_running_loop().run_in_executor(state.decode_pool, _decode, *args)
            input_name, array = next(iter(decoded.inputs.items()))
            future = state.batcher.submit(task, array)
            del body  # the batcher holds the array (a view of the body for binary data), nothing else
            result = await asyncio.wrap_future(future)
            outputs = _select_outputs(task, result, decoded)
            outputs = extensions.apply_classification(task, outputs, decoded.output_parameters)
            payload, header_length = encode_response(task.name, decoded.id, outputs, MODEL_VERSION)
        except ClientDisconnect:
            closed = request.scope.get(CLOSED_SCOPE_KEY)
            if closed is None:  # the client went away (not a server-side timeout, counted by the protocol)
                state.limit_metrics.disconnects.inc()
                log.info("request %s: the client disconnected before sending its whole body", rid)
            else:
                log.warning("request %s: connection closed (%s)", rid, closed)
            return Response(status_code=499)  # nobody reads it: the connection is gone
        except FptDeployError as e:
            status = 404 if isinstance(e, UnknownNameError) else getattr(e, "status", 500)
            state.metrics.observe_request(label, status)
            log.warning("request %s: %d for model %r: %s", rid, status, name[:40], e)
            return error(status, str(e), rid, close=not body_read)
        except Exception:  # noqa: BLE001  (an internal failure answers 500; the server stays up)
            log.exception("request %s: inference for %r failed", rid, name[:40])
            state.metrics.observe_request(label, 500)
            return error(500, f"internal server error (request {rid}); the server log has the details", rid)
        finally:
            state.budget.give(reserved)
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

    @app.get("/openapi.json")
    async def openapi():
        tasks = state.model.tasks
        example = None
        if tasks:  # one row of ones for the first model: a request that succeeds
            task = next(iter(tasks.values()))
            shape = [1, *task.example_shape]
            ones = [1] * int(np.prod(shape))
            datatype = triton_dtype(task.input_dtype)
            example = {"inputs": [{"name": task.input_name, "datatype": datatype, "shape": shape, "data": ones}]}
        return JSONResponse(with_examples(openapi_document(app), list(tasks), example))

    return app


def openapi_document(app: FastAPI) -> dict:
    """``app.state.openapi_paths``, plus FastAPI's description of any other schema route (extensions)."""
    from fastapi.openapi.utils import get_openapi

    described = app.state.openapi_paths
    others = [r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema and r.path not in described]
    doc = build_document(dict(described), _version(), SERVER_NAME)
    if others:
        generated = get_openapi(title=SERVER_NAME, version=_version(), routes=others)
        doc["paths"] = {**generated.get("paths", {}), **doc["paths"]}
        doc["components"]["schemas"] = {
            **generated.get("components", {}).get("schemas", {}),
            **doc["components"]["schemas"],
        }
    return doc


def uvicorn_config(app, config: ServeConfig, on_close=lambda reason: None):
    """uvicorn's settings for ``config``: our protocol with its limits, keep-alive and shutdown grace."""
    import uvicorn

    limits = ConnectionLimits(
        max_header_bytes=config.max_header_bytes,
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        min_body_rate=config.min_body_rate,
    )
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=limited_protocol(limits, on_close),
        log_level="info" if config.access_log else "warning",
        access_log=config.access_log,
        log_config=None,  # uvicorn's lines in the server's format (time, level): metrics.configure_server_logs
        timeout_keep_alive=config.keep_alive_timeout_s,
        timeout_graceful_shutdown=config.graceful_timeout_s,
        lifespan="on",
    )


def serve(config: ServeConfig) -> None:
    """Load the repository, then serve it until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    configure_server_logs(config.access_log)
    state = ServerState.load(config)
    app = create_app(state)
    grpc = None
    if config.grpc_port is not None:  # the same state: one batcher, one repository control
        grpc, _ = start_grpc_server(
            state, extensions.control_of(state), config.host, config.grpc_port, max_message_bytes=config.max_body_bytes
        )
    log.info(
        "serving %d model(s) (%s) on http://%s:%d with %s",
        len(state.model.tasks),
        ", ".join(state.model.tasks),
        config.host,
        config.port,
        state.model.runtime.name,
    )
    server = uvicorn.Server(uvicorn_config(app, config, lambda reason: state.limit_metrics.closed.labels(reason).inc()))
    try:
        server.run()
    finally:
        if grpc is not None:
            grpc.stop(config.graceful_timeout_s).wait()
        if state.ready:  # the lifespan shutdown did not run (startup failed, say)
            state.close(config.graceful_timeout_s)
