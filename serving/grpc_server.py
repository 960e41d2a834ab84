"""The Open Inference Protocol over gRPC (``--grpc-port``): Triton's ``GRPCInferenceService``.

The service definitions are the ones tritonclient ships (``tritonclient.grpc.service_pb2``), so
``tritonclient.grpc`` talks to this server as to Triton: health, metadata, infer, the model
repository, statistics and model configuration (streaming and shared memory aside). Requests join
the HTTP server's one batcher and go through the same input validation (``protocol.validate_inputs``)
and the same repository control, so a task behaves the same over either protocol.

gRPC calls run on the server's thread pool: each waits on its batcher future there, never on the
HTTP event loop.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
import numpy as np
from fpt_deploy.serving.extensions import EXTENSIONS, apply_classification, model_config, status_of
from fpt_deploy.serving.metrics import MODEL_VERSION, UNKNOWN_MODEL
from fpt_deploy.serving.protocol import (
    DeclaredTensor,
    InferRequest,
    InputContract,
    triton_dtype,
    validate_inputs,
)
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fpt_deploy.errors import UnknownNameError

log = logging.getLogger(__name__)

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# InferTensorContents field of each datatype (a client that does not send raw bytes uses these).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _parameter(p: service_pb2.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1).tolist())


def declared_tensors(request: service_pb2.ModelInferRequest) -> list[DeclaredTensor]:
    """The request's inputs as transport-independent declarations (raw bytes, or typed contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        from fpt_deploy.serving.errors import MalformedRequestError

        raise MalformedRequestError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        )
    tensors = []
    for i, t in enumerate(request.inputs):
        common = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "field": f"inputs[{i}]"}
        if raw:
            tensors.append(DeclaredTensor(**common, raw=raw[i]))
        else:
            field = _CONTENTS.get(t.datatype)
            data = list(getattr(t.contents, field)) if field else None
            tensors.append(DeclaredTensor(**common, data=data, may_hold_booleans=t.datatype == "BOOL"))
    return tensors


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` over the HTTP server's state (model, batcher, metrics, repository control)."""

    def __init__(self, state, control) -> None:
        self.state, self.control = state, control

    def _abort(self, context, error: Exception, what: str):
        status = status_of(error)
        if status >= 500:
            log.exception("gRPC %s failed", what)
        context.abort(_CODES.get(status, grpc.StatusCode.INTERNAL), str(error))

    def _task(self, name: str, version: str, context):
        try:
            task = self.state.model.task(name)
            if version not in ("", MODEL_VERSION):
                raise UnknownNameError(f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
            return task
        except UnknownNameError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=bool(self.state.ready))

    def ModelReady(self, request, context):
        ready = self.state.ready and self.state.model.is_ready(request.name) and request.version in ("", MODEL_VERSION)
        return service_pb2.ModelReadyResponse(ready=bool(ready))

    def ServerMetadata(self, request, context):
        from fpt_deploy.serving.server import SERVER_NAME, _version

        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        from fpt_deploy.serving.server import model_outputs

        task = self._task(request.name, request.version, context)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=task.name,
            versions=[MODEL_VERSION],
            platform="fpt-deploy",
            inputs=[
                tensor(name=task.input_name, datatype=triton_dtype(task.input_dtype), shape=[-1, *task.example_shape])
            ],
            outputs=[tensor(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in model_outputs(task)],
        )

    def ModelInfer(self, request, context):
        from fpt_deploy.serving.server import _select_outputs

        t0 = time.perf_counter()
        name = request.model_name
        label = name if name in self.state.model.tasks else UNKNOWN_MODEL
        try:
            task = self.state.model.task(name)
            if request.model_version not in ("", MODEL_VERSION):
                raise UnknownNameError(
                    f"model {name!r} has only version {MODEL_VERSION}, not {request.model_version!r}"
                )
            contract = InputContract.of(task, self.state.batcher.max_batch_size)
            inputs = validate_inputs(contract, declared_tensors(request))
            input_name, array = next(iter(inputs.items()))
            task.check_input(input_name, array, self.state.batcher.max_batch_size)
            result = self.state.batcher.submit(task, array).result()
            wanted = {o.name: {k: _parameter(v) for k, v in o.parameters.items()} for o in request.outputs}
            decoded = InferRequest(inputs, request.id or None, {n: True for n in wanted} if wanted else None)
            outputs = apply_classification(task, _select_outputs(task, result, decoded), wanted)
        except Exception as e:  # noqa: BLE001  (every failure becomes a gRPC status; the server stays up)
            status = status_of(e)
            self.state.metrics.observe_request(label, status, time.perf_counter() - t0)
            log.warning("gRPC infer %s (request id %r) failed with %d: %s", name, request.id, status, e)
            self._abort(context, e, "infer")
        response = service_pb2.ModelInferResponse(model_name=task.name, model_version=MODEL_VERSION, id=request.id)
        for out_name, out, _ in outputs:
            is_bytes = out.dtype == object
            response.outputs.add(
                name=out_name, datatype="BYTES" if is_bytes else triton_dtype(out.dtype), shape=out.shape
            )
            response.raw_output_contents.append(
                encode_bytes_tensor(out)
                if is_bytes
                else np.ascontiguousarray(out).astype(out.dtype.newbyteorder("<")).tobytes()
            )
        self.state.metrics.observe_request(label, 200, time.perf_counter() - t0)
        return response

    def ModelStatistics(self, request, context):
        tasks = list(self.state.model.tasks)
        entries = self.state.metrics.statistics(tasks)
        if request.name:
            entries = [e for e in entries if e["name"] == request.name]
            if not entries:
                context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served here")
        return json_format.ParseDict({"model_stats": entries}, service_pb2.ModelStatisticsResponse())

    def ModelConfig(self, request, context):
        task = self._task(request.name, request.version, context)
        return json_format.ParseDict({"config": model_config(self.state, task)}, service_pb2.ModelConfigResponse())

    def RepositoryIndex(self, request, context):
        try:
            entries = self.control.index(request.ready)
        except Exception as e:  # noqa: BLE001
            self._abort(context, e, "repository index")
        return json_format.ParseDict({"models": entries}, service_pb2.RepositoryIndexResponse())

    def RepositoryModelLoad(self, request, context):
        try:
            self.control.load(request.model_name, _repository_parameters(request))
        except Exception as e:  # noqa: BLE001
            self._abort(context, e, "load")
        return service_pb2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        try:
            self.control.unload(request.model_name, _repository_parameters(request))
        except Exception as e:  # noqa: BLE001
            self._abort(context, e, "unload")
        return service_pb2.RepositoryModelUnloadResponse()


def _repository_parameters(request) -> dict:
    """A load or unload request's ``ModelRepositoryParameter`` map as plain values (checked by the control)."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in request.parameters.items()}


def start_grpc_server(state, control, host: str, port: int, *, max_message_bytes: int = 64 << 20, workers: int = 32):
    """Start serving ``GRPCInferenceService`` on ``host:port`` (0: any free port); returns (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fpt-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state, control), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        from fpt_deploy.errors import ConfigError

        raise ConfigError(f"cannot listen for gRPC on {host}:{port}; pick another --grpc-port")
    server.start()
    log.info("serving gRPC (KServe v2) on %s:%d", host, bound)
    return server, bound
