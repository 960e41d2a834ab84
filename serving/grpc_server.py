"""The Open Inference Protocol over gRPC (``--grpc-port``): Triton's ``GRPCInferenceService``.

The service definitions are the ones tritonclient ships (``tritonclient.grpc.service_pb2``), so
``tritonclient.grpc`` talks to this server as to Triton: health, metadata, infer, the model
repository, statistics and model configuration (streaming and shared memory aside). This module is
an adapter: protobuf messages in, the ``InferenceService`` (service.py) in between, protobuf out;
requests join the HTTP server's one batcher and go through the same validation
(``protocol.check_declared``/``decode_tensor``) and the same repository control.

A ``ModelInferRequest`` is bounded as an HTTP body is, before any of it is parsed:

- the server refuses a message over ``max_receive_message_length``: the largest valid request of
  any task the repository lists on the served body, plus headroom (``server_message_limit``);
- the infer handler receives the message as bytes and reads only its envelope (model name and
  version, how many inputs) from the wire (``read_envelope``); a message larger than its model's
  largest valid request (``message_limit``: declared shape times max batch size, at the widest
  encoding of each value) is refused with RESOURCE_EXHAUSTED, and its bytes are counted in the
  server's shared buffered-bytes budget (``http_limits.BodyBudget``) while it is held;
- only then is it parsed; typed contents are counted against the declared shape before numpy
  converts them (never into Python lists); a message that is not protobuf is INVALID_ARGUMENT.

Each failure is one log line; only an internal error (500) logs its traceback. gRPC calls run on
the server's thread pool: each waits on its batcher future there, never on the HTTP event loop.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent import futures
from dataclasses import dataclass, replace

import grpc
import numpy as np
from fpt_deploy.serving.errors import MalformedRequestError, RequestTooLargeError
from fpt_deploy.serving.protocol import (
    MODEL_VERSION,
    DeclaredTensor,
    InferRequest,
    InputContract,
    check_declared,
    decode_tensor,
    triton_dtype,
)
from fpt_deploy.serving.service import InferenceService, status_of
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fpt_deploy.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,  # an unload that met requests in flight: retry
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
# InferTensorContents field of each datatype (a client that does not send raw bytes uses these):
# (field, numpy dtype of its values, most bytes one value takes on the wire: a varint's 10 at worst).
_CONTENTS = {
    "BOOL": ("bool_contents", np.dtype(np.bool_), 1),
    "INT8": ("int_contents", np.dtype(np.int32), 10),
    "INT16": ("int_contents", np.dtype(np.int32), 10),
    "INT32": ("int_contents", np.dtype(np.int32), 10),
    "INT64": ("int64_contents", np.dtype(np.int64), 10),
    "UINT8": ("uint_contents", np.dtype(np.uint32), 5),
    "UINT16": ("uint_contents", np.dtype(np.uint32), 5),
    "UINT32": ("uint_contents", np.dtype(np.uint32), 5),
    "UINT64": ("uint64_contents", np.dtype(np.uint64), 10),
    "FP32": ("fp32_contents", np.dtype(np.float32), 4),
    "FP64": ("fp64_contents", np.dtype(np.float64), 8),
}
# Room in a message besides the tensor data: names, id, parameters, outputs and their framing.
MESSAGE_ENVELOPE_BYTES = 16 << 10
# The server's message cap over the largest model bound: room for a task exported later.
MESSAGE_HEADROOM_BYTES = 1 << 20
# Most inputs, raw contents or outputs one message may declare (a model takes one input, offers three
# outputs), and most top-level fields in all (parameters included): read before anything is parsed.
MAX_TENSORS = 16
MAX_FIELDS = 1024


def message_limit(contract: InputContract) -> int:
    """The largest ``ModelInferRequest`` a valid request of ``contract`` can be, in bytes."""
    typed = _CONTENTS.get(contract.datatype, (None, None, 0))[2]
    return MESSAGE_ENVELOPE_BYTES + contract.max_elements * max(contract.dtype.itemsize, typed)


def server_message_limit(service: InferenceService, max_body_bytes: int) -> int:
    """The server's receive cap: the largest task's ``message_limit`` plus headroom, at most ``max_body_bytes``."""
    bounds = [message_limit(c) for c in service.contracts()]
    return min(max_body_bytes, max(bounds) + MESSAGE_HEADROOM_BYTES) if bounds else max_body_bytes


# -- reading a message's envelope from the wire ------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """What the infer handler reads of a message before parsing it."""

    model_name: str
    model_version: str
    inputs: int  # how many ``inputs`` it declares
    outputs: int


def _varint(message: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(message) and shift < 64:
        byte = message[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MalformedRequestError("the message is not a ModelInferRequest (a varint runs past its end)")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise MalformedRequestError(f"the message's {what} is not UTF-8") from None


def read_envelope(message: bytes) -> Envelope:
    """Model name and version, and the number of inputs and outputs, from the top-level wire fields.

    A loop over fields, not values: a valid message has a handful. More than ``MAX_TENSORS`` inputs,
    raw contents or outputs, or ``MAX_FIELDS`` fields, is refused as soon as it is counted.
    """
    counts = {5: 0, 6: 0, 7: 0}  # inputs, outputs, raw_input_contents
    strings = {1: b"", 2: b""}
    pos = fields = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire = tag >> 3, tag & 7
        fields += 1
        if number == 0 or fields > MAX_FIELDS:
            raise MalformedRequestError(
                "the message is not a ModelInferRequest" if number == 0 else f"the message has over {MAX_FIELDS} fields"
            )
        if wire == 0:
            _, pos = _varint(message, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(message, pos)
            if number in strings:
                strings[number] = message[pos : pos + size]
            pos += size
        else:
            raise MalformedRequestError(f"the message is not a ModelInferRequest (wire type {wire} of field {number})")
        if pos > len(message):
            raise MalformedRequestError("the message is not a ModelInferRequest (a field runs past its end)")
        if number in counts:
            counts[number] += 1
            if counts[number] > MAX_TENSORS:
                what = {5: "inputs", 6: "outputs", 7: "raw_input_contents"}[number]
                raise MalformedRequestError(f"the request has more than {MAX_TENSORS} {what}; a model takes one input")
    return Envelope(_text(strings[1], "model name"), _text(strings[2], "model version"), counts[5], counts[6])


# -- inputs and outputs ------------------------------------------------------------------------------


def _parameter(p: service_pb2.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1).tolist())


def request_inputs(request: service_pb2.ModelInferRequest, contract: InputContract | None) -> dict[str, np.ndarray]:
    """The validated input arrays of ``request``: declarations first, then counts, then values (numpy)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise MalformedRequestError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        )
    heads = [
        DeclaredTensor(name=t.name, datatype=t.datatype, shape=list(t.shape), field=f"inputs[{i}]")
        for i, t in enumerate(request.inputs)
    ]
    declared = check_declared(contract, heads)
    tensors = []
    for t, head, (_, shape) in zip(request.inputs, heads, declared, strict=True):
        if raw:
            tensors.append(replace(head, raw=raw[len(tensors)]))
            continue
        if t.datatype not in _CONTENTS:
            raise MalformedRequestError(f"{head.field} ({t.name!r}): send {t.datatype} data in raw_input_contents")
        field, dtype, _ = _CONTENTS[t.datatype]
        values = getattr(t.contents, field)
        if len(values) != math.prod(shape):  # counted before a single value is converted
            raise MalformedRequestError(
                f"{head.field} ({t.name!r}) has {len(values)} values in contents.{field}, "
                f"but shape {list(shape)} needs {math.prod(shape)}"
            )
        tensors.append(replace(head, values=np.fromiter(values, dtype, count=len(values))))
    return {t.name: decode_tensor(t, dtype, shape) for t, (dtype, shape) in zip(tensors, declared, strict=True)}


def _parse(message: bytes) -> service_pb2.ModelInferRequest:
    try:
        return service_pb2.ModelInferRequest.FromString(message)
    except DecodeError as e:
        raise MalformedRequestError(f"the message is not a ModelInferRequest ({e})") from None


def _response(task, request_id: str, outputs: list[tuple[str, np.ndarray, bool]]) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=task.name, model_version=MODEL_VERSION, id=request_id)
    for name, out, _ in outputs:
        is_bytes = out.dtype == object
        response.outputs.add(name=name, datatype="BYTES" if is_bytes else triton_dtype(out.dtype), shape=out.shape)
        little = None if is_bytes else np.ascontiguousarray(out).astype(out.dtype.newbyteorder("<"))
        response.raw_output_contents.append(encode_bytes_tensor(out) if is_bytes else little.tobytes())
    return response


# -- the servicer ------------------------------------------------------------------------------------


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` over the ``InferenceService``, a repository control and the byte budget."""

    def __init__(self, service: InferenceService, control, budget) -> None:
        self.service, self.control, self.budget = service, control, budget

    def _abort(self, context, error: Exception, what: str):
        """Answer ``error`` as its status's code; one log line (a traceback only for internal errors)."""
        status = status_of(error)
        if status >= 500 and status != 503:
            log.exception("gRPC %s failed", what)
        else:
            log.warning("gRPC %s: %d %s", what, status, error)
        context.abort(_CODES.get(status, grpc.StatusCode.INTERNAL), str(error))

    def _task(self, name: str, version: str, context):
        try:
            return self.service.task(name, version)
        except Exception as e:  # noqa: BLE001
            self._abort(context, e, f"model {name[:40]!r}")

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=bool(self.service.ready))

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.service.is_ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.service.server_metadata(), service_pb2.ServerMetadataResponse())

    def ModelMetadata(self, request, context):
        meta = self.service.metadata(self._task(request.name, request.version, context))
        meta.pop("parameters")  # not in gRPC's ModelMetadataResponse
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    def ModelInfer(self, message: bytes, context):
        """``message``: the serialized ``ModelInferRequest``, bounded before it is parsed."""
        t0 = time.perf_counter()
        name, held = "", 0
        try:
            envelope = read_envelope(message)
            name = envelope.model_name
            task = self.service.task(name, envelope.model_version)
            contract = self.service.contract(task)
            limit = message_limit(contract)
            if len(message) > limit:
                raise RequestTooLargeError(
                    f"the request has {len(message)} bytes; the largest valid one for model {name!r} "
                    f"({contract.describe()}, at most {contract.max_rows} rows) has {limit}"
                )
            self.budget.take(len(message))
            held = len(message)
            request = _parse(message)
            inputs = request_inputs(request, contract)
            result = self.service.submit(task, inputs).result()
            wanted = {o.name: {k: _parameter(v) for k, v in o.parameters.items()} for o in request.outputs}
            decoded = InferRequest(
                inputs, request.id or None, dict.fromkeys(wanted, True) or None, output_parameters=wanted
            )
            response = _response(task, request.id, self.service.outputs(task, result, decoded))
        except Exception as e:  # noqa: BLE001  (every failure becomes a gRPC status; the server stays up)
            self.service.failed(name, e, time.perf_counter() - t0)
            self._abort(context, e, f"infer {name[:40]!r}")
        finally:
            if held:
                self.budget.give(held)
        self.service.succeeded(name, time.perf_counter() - t0)
        return response

    def ModelStatistics(self, request, context):
        try:
            entries = self.service.statistics(request.name or None, request.version or None)
        except Exception as e:  # noqa: BLE001
            self._abort(context, e, "statistics")
        return json_format.ParseDict({"model_stats": entries}, service_pb2.ModelStatisticsResponse())

    def ModelConfig(self, request, context):
        config = self.service.model_config(self._task(request.name, request.version, context))
        return json_format.ParseDict({"config": config}, service_pb2.ModelConfigResponse())

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


def _handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Every method of the service; ``ModelInfer`` takes its message as bytes (``InferenceServicer.ModelInfer``)."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(service_pb2, method.input_type.name)
        response = getattr(service_pb2, method.output_type.name)
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=None if method.name == "ModelInfer" else request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def start_grpc_server(
    service: InferenceService,
    control,
    budget,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    workers: int = 32,
):
    """Serve ``GRPCInferenceService`` on ``host:port`` (0: any free port); returns (server, port).

    ``budget`` is the HTTP server's ``BodyBudget`` (infer messages count in it while held);
    ``max_message_bytes`` caps every message received (``server_message_limit``).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fpt-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),  # answers are bounded by the request's rows
            # A fixed 4 MiB stream window instead of one grown by bandwidth probing: a message over the
            # cap is refused from its length prefix, and the bytes already in flight behind it stay
            # within one window a stream, however many clients send oversized messages at once.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 4 << 20),
        ],
    )
    server.add_generic_rpc_handlers((_handlers(InferenceServicer(service, control, budget)),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise ConfigError(f"cannot listen for gRPC on {host}:{port}; pick another --grpc-port")
    server.start()
    log.info("serving gRPC (KServe v2) on %s:%d (messages up to %d bytes)", host, bound, max_message_bytes)
    return server, bound
