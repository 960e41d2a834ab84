"""The HTTP server: Open Inference Protocol (KServe v2) endpoints, as Triton serves them.

    GET  /v2/health/live, /v2/health/ready, /v2            server health and metadata
    GET  /v2/models/{task}[/versions/{v}][/ready]         model metadata and readiness
    POST /v2/models/{task}[/versions/{v}]/infer           JSON tensors and the binary extension
    GET  /metrics                                         Prometheus
    GET  /openapi.json                                    this surface, described (serving/openapi.py)

This module is the HTTP adapter over the protocol-neutral ``InferenceService`` (service.py), which
gRPC (grpc_server.py) shares: here a request's body is read under its limits and decoded
(protocol.py); the service resolves the model and version, checks and batches the input, selects
the outputs and maps each error to its status. The request path is split into hooks (decode the
request, predict on a batch, encode the response).
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
from fpt_deploy.serving.config import ServeConfig
from fpt_deploy.serving.errors import QueueFullError
from fpt_deploy.serving.extensions import router as extension_routes
from fpt_deploy.serving.grpc_server import server_message_limit, start_grpc_server
from fpt_deploy.serving.http_limits import (
    CLOSED_SCOPE_KEY,
    BodyBudget,
    ConnectionLimits,
    limited_protocol,
    read_body,
)
from fpt_deploy.serving.metrics import configure_server_logs
from fpt_deploy.serving.model import LoadedTask
from fpt_deploy.serving.openapi import CORE_PATHS, build_document, with_examples
from fpt_deploy.serving.protocol import (
    HEADER_LENGTH,
    MODEL_VERSION,
    InferRequest,
    InputContract,
    JsonLimits,
    decode_request,
    encode_response,
    triton_dtype,
)
from fpt_deploy.serving.repository import control_of, startup_tasks  # the one import of repository control
from fpt_deploy.serving.service import SERVER_NAME, InferenceService, server_version, status_of
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fpt_deploy.errors import FptDeployError

log = logging.getLogger(__name__)

# The batcher's worker re-takes the GIL after every runtime call; with the event loop busy in Python
# it waits up to this interval each time while the backbone's cores sit idle. CPython's default (5 ms)
# costs the worker a large share of its time in GIL waits under load (bench/serve_load.py measures it).
GIL_SWITCH_INTERVAL_S = 1e-4
# Bodies up to this size decode on the event loop (a thread hop costs more); larger ones in a pool.
INLINE_DECODE_BYTES = 64 << 10
DECODE_THREADS = 2
REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
    """The HTTP side of a server: the ``InferenceService``, HTTP limits and body budget, repository control."""

    def __init__(self, service: InferenceService, config: ServeConfig) -> None:
        self.service, self.config = service, config
        self.limit_metrics = LimitMetrics(service.metrics.registry)
        self.budget = BodyBudget(config.max_buffered_bytes, self.limit_metrics.buffered)
        self.json_limits = JsonLimits(max_depth=config.json_max_depth, max_number_chars=config.json_max_number_chars)
        self.decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fpt-decode")
        self.control = None  # made on first use (``control_of``)

    @classmethod
    def load(cls, config: ServeConfig) -> ServerState:
        # explicit mode: --load-model's tasks only
        return cls(InferenceService.of(config, startup_tasks(config)), config)

    # what repository control and tests read: the service's
    @property
    def model(self):
        return self.service.model

    @property
    def batcher(self):
        return self.service.batcher

    @property
    def metrics(self):
        return self.service.metrics

    @property
    def ready(self) -> bool:
        return self.service.ready

    def contract(self, task: LoadedTask) -> InputContract:
        return self.service.contract(task)

    def body_limit(self, contract: InputContract | None) -> int:
        """The largest body accepted: the server's limit, or less when no valid request could be larger."""
        limit = self.config.max_body_bytes
        return limit if contract is None else min(limit, contract.max_body_bytes(self.json_limits))

    async def read_json(self, request: Request) -> dict:
        """A small JSON object body (extensions), bounded and counted as ``infer``'s are."""
        from fpt_deploy.serving.http_limits import read_json_body

        return await read_json_body(request, self.budget, self.json_limits)

    def close(self, timeout: float | None = None) -> None:
        self.service.close(timeout)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str, rid: str | None = None, close: bool = False) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: rid} if rid else {}
    if close:  # the body was not read: don't let the client send the rest of it on this connection
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _decode(body: bytearray, header_length: str | None, contract: InputContract, limits: JsonLimits) -> InferRequest:
    return decode_request(body, header_length, contract, limits)


class InferEndpoint:
    """``POST .../infer``: read the body under its model's bound, decode it, and let the service answer.

    A plain Starlette route (``handle``): it parses its own input, so FastAPI's parameter and
    dependency machinery would only add to the event loop's work per request.
    """

    PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

    def __init__(self, state: ServerState) -> None:
        self.state, self.service = state, state.service
        self._ids = itertools.count(1)

    def request_id(self, request: Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER)
        if given and _CLIENT_REQUEST_ID.fullmatch(given):
            return given
        return f"r{next(self._ids)}"

    async def handle(self, request: Request) -> Response:
        t0 = time.perf_counter()
        rid = self.request_id(request)
        name = request.path_params["name"]
        reserved, body_read = 0, False
        try:
            task = self.service.task(name, request.path_params.get("version"))
            contract = self.service.contract(task)
            if self.service.batcher.is_full():  # refused before its body is read, as it would be after
                raise QueueFullError(f"the queue is full ({self.service.batcher.queued} requests waiting); retry later")
            try:
                body, reserved = await read_body(request, self.state.body_limit(contract), self.state.budget)
            except BaseException as e:
                reserved = getattr(e, "reserved", 0)
                raise
            body_read = True
            decoded = await self._decode(body, request.headers.get(HEADER_LENGTH), contract)
            future = self.service.submit(task, decoded.inputs)
            del body  # the batcher holds the array (a view of the body for binary data), nothing else
            result = await asyncio.wrap_future(future)
            outputs = self.service.outputs(task, result, decoded)
            payload, header_length = encode_response(task.name, decoded.id, outputs, MODEL_VERSION)
        except ClientDisconnect:
            self._disconnected(request, rid)
            return Response(status_code=499)  # nobody reads it: the connection is gone
        except FptDeployError as e:
            status = self.service.failed(name, e)
            log.warning("request %s: %d for model %r: %s", rid, status, name[:40], e)
            return _error(status, str(e), rid, close=not body_read)
        except Exception as e:  # noqa: BLE001  (an internal failure answers 500; the server stays up)
            log.exception("request %s: inference for %r failed", rid, name[:40])
            self.service.failed(name, e)
            return _error(500, f"internal server error (request {rid}); the server log has the details", rid)
        finally:
            self.state.budget.give(reserved)
        self.service.succeeded(name, time.perf_counter() - t0)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def _decode(self, body: bytearray, header_length: str | None, contract: InputContract) -> InferRequest:
        args = (body, header_length, contract, self.state.json_limits)
        if len(body) <= INLINE_DECODE_BYTES:
            return decode_request(*args)
        return await asyncio.get_running_loop().run_in_executor(self.state.decode_pool, decode_request, *args)

    def _disconnected(self, request: Request, rid: str) -> None:
        closed = request.scope.get(CLOSED_SCOPE_KEY)
        if closed is None:  # the client went away (not a server-side timeout, counted by the protocol)
            self.state.limit_metrics.disconnects.inc()
            log.info("request %s: the client disconnected before sending its whole body", rid)
        else:
            log.warning("request %s: connection closed (%s)", rid, closed)


def _lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting connections and finished in-flight requests (graceful shutdown);
        # now finish whatever the batcher still holds and free the runtime.
        await asyncio.get_running_loop().run_in_executor(None, state.close, 60.0)
        log.info("shut down after finishing in-flight requests")

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """FastAPI's own refusals (unknown path, bad parameters) as ``{"error": message}``."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors()[:4])
        return JSONResponse({"error": problems}, status_code=400)


def _add_core_routes(api: FastAPI, service: InferenceService) -> None:
    """Health, server and model metadata, model readiness, and Prometheus metrics."""

    @api.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if service.ready else 503)

    @api.get("/v2")
    async def server_metadata():
        return service.server_metadata()

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = MODEL_VERSION):
        try:
            return service.metadata(service.task(name, version))
        except FptDeployError as e:
            return _error(status_of(e), str(e))

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = MODEL_VERSION):
        try:
            service.task(name)
        except FptDeployError as e:
            return _error(status_of(e), str(e))
        return Response(status_code=200 if service.is_ready(name, version) else 404)

    @api.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _openapi_route(app: FastAPI, service: InferenceService) -> None:
    @app.get("/openapi.json")
    async def openapi():
        tasks = service.model.tasks
        example = None
        if tasks:  # one row of ones for the first model: a request that succeeds
            task = next(iter(tasks.values()))
            shape = [1, *task.example_shape]
            ones = [1] * int(np.prod(shape))
            datatype = triton_dtype(task.input_dtype)
            example = {"inputs": [{"name": task.input_name, "datatype": datatype, "shape": shape, "data": ones}]}
        return JSONResponse(with_examples(openapi_document(app), list(tasks), example))


def create_app(state: ServerState, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI application over ``state``; closing the app drains the batcher.

    ``routers`` (more extensions) are included first, so fixed paths such as ``/v2/models/stats``
    win over ``/v2/models/{name}``. Their routes are described in /openapi.json from their FastAPI
    signatures, or by entries they add to ``app.state.openapi_paths``. Extensions that read a body use
    ``read_body`` (bounded, counted in the budget) and ``protocol.parse_json`` (depth and number
    limits), as ``infer`` does.
    """
    app = FastAPI(title=SERVER_NAME, lifespan=_lifespan(state), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.openapi_paths = dict(CORE_PATHS)
    _add_error_handlers(app)
    for extension in routers:
        app.include_router(extension)
    # before /v2/models/{name}: .../stats and .../config win
    app.include_router(extension_routes(state.service, control_of(state), state.read_json))
    _add_core_routes(app, state.service)
    infer = InferEndpoint(state)
    for path in InferEndpoint.PATHS:
        app.add_route(path, infer.handle, methods=["POST"])
    _openapi_route(app, state.service)
    return app


def openapi_document(app: FastAPI) -> dict:
    """``app.state.openapi_paths``, plus FastAPI's description of any other schema route (extensions)."""
    from fastapi.openapi.utils import get_openapi

    described = app.state.openapi_paths
    others = [r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema and r.path not in described]
    doc = build_document(dict(described), server_version(), SERVER_NAME)
    if others:
        generated = get_openapi(title=SERVER_NAME, version=server_version(), routes=others)
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


def start_grpc_of(state: ServerState, port: int | None = None):
    """gRPC beside HTTP over the same service, repository control and byte budget; (server, port)."""
    config = state.config
    return start_grpc_server(
        state.service,
        control_of(state),
        state.budget,
        config.host,
        config.grpc_port if port is None else port,
        max_message_bytes=server_message_limit(state.service, config.max_body_bytes),
    )


def serve(config: ServeConfig) -> None:
    """Load the repository, then serve it until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    configure_server_logs(config.access_log)
    state = ServerState.load(config)
    app = create_app(state)
    grpc = None
    if config.grpc_port is not None:
        grpc, _ = start_grpc_of(state)
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
