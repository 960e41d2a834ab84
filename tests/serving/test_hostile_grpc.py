"""gRPC as an attacker uses it: messages bounded per model before they are parsed, counted in the
shared byte budget, and malformed or refused calls answered with one log line.

An in-process server (HTTP and gRPC) over the synthetic repository; messages go out as bytes, so a
test can send what no client library would build.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fpt_deploy.serving import ServeConfig

from tests.serving.live import live_server

grpc = pytest.importorskip("grpc", reason="needs grpcio (pip install -e '.[dev]')")
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2", reason="needs tritonclient[grpc]")

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def live(synthetic_repo):
    config = ServeConfig(repo=synthetic_repo, threads=1, max_queue_delay_ms=1, max_buffered_bytes=1024)
    with live_server(config) as server:
        yield server


def call(live, message: bytes):
    """(status code, details, response) of ModelInfer with ``message`` as its raw bytes."""
    with grpc.insecure_channel(live.grpc_url) as channel:
        infer = channel.unary_unary(INFER, response_deserializer=service_pb2.ModelInferResponse.FromString)
        try:
            return grpc.StatusCode.OK, "", infer(message, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details(), None


def vec_request(rows: int = 1, **contents) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="vec")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, 4, 3])
    if contents:
        for field, values in contents.items():
            getattr(tensor.contents, field).extend(values)
    else:
        request.raw_input_contents.append(np.ones((rows, 4, 3), "<f4").tobytes())
    return request


def test_a_good_request_is_answered(live):
    code, _, response = call(live, vec_request(fp32_contents=[1.0] * 12).SerializeToString())
    assert code == grpc.StatusCode.OK and response.model_name == "vec"


def test_typed_contents_beyond_the_models_bound_are_refused_before_parsing(live):
    """Case 1: typed contents far larger than any valid request of the model (HTTP answers 413)."""
    request = vec_request(fp32_contents=[0.0] * (150 << 10))  # 600 KB of zeros: under the server's cap
    code, details, _ = call(live, request.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "model 'vec'" in details and "largest valid" in details
    huge = vec_request(fp32_contents=[0.0] * (1 << 20))  # 4 MB: over the server's own cap
    code, details, _ = call(live, huge.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    test_a_good_request_is_answered(live)


def test_many_declared_inputs_are_refused_from_the_envelope(live):
    """Case 1: 200,000 declared (empty) inputs are counted on the wire, never parsed into messages."""
    message = service_pb2.ModelInferRequest(model_name="vec").SerializeToString() + b"\x2a\x00" * 200_000
    code, details, _ = call(live, message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than 16 inputs" in details


def test_typed_values_are_counted_against_the_declared_shape(live):
    code, details, _ = call(live, vec_request(fp32_contents=[1.0] * 13).SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "13 values in contents.fp32_contents" in details and "needs 12" in details


def test_grpc_messages_count_in_the_shared_byte_budget(live):
    """A request over what the server may buffer (1024 bytes here) gets UNAVAILABLE, as over HTTP."""
    code, details, _ = call(live, vec_request(rows=32).SerializeToString())  # 384 float32 values: 1.5 KB
    assert code == grpc.StatusCode.UNAVAILABLE and "retry later" in details
    assert live.state.budget.held == 0
    test_a_good_request_is_answered(live)


def test_malformed_protobuf_is_invalid_argument_with_one_warning(live, caplog):
    """Case 8: bytes that are no ModelInferRequest: INVALID_ARGUMENT, one warning line, no traceback."""
    with caplog.at_level(logging.WARNING):
        code, details, _ = call(live, b"\xff\xff\xff\xff\x0f")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "not a ModelInferRequest" in details
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert not any(r.exc_info for r in caplog.records)


def test_refusals_during_shutdown_are_logged_without_tracebacks(synthetic_repo, caplog):
    """Case 8: once the server is closing, infer is UNAVAILABLE and logged as one line."""
    with live_server(ServeConfig(repo=synthetic_repo, threads=1)) as server:
        server.state.close(5)
        with caplog.at_level(logging.WARNING):
            code, details, _ = call(server, vec_request().SerializeToString())
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    assert caplog.records and not any(r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def test_the_envelope_is_read_from_the_wire():
    from fpt_deploy.serving.errors import MalformedRequestError
    from fpt_deploy.serving.grpc_server import MAX_TENSORS, read_envelope

    request = vec_request()
    request.model_version = "1"
    request.outputs.add(name="labels")
    envelope = read_envelope(request.SerializeToString())
    assert (envelope.model_name, envelope.model_version, envelope.inputs, envelope.outputs) == ("vec", "1", 1, 1)
    for bad in (b"\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0a\x80"):
        with pytest.raises(MalformedRequestError):
            read_envelope(bad)
    with pytest.raises(MalformedRequestError, match=f"more than {MAX_TENSORS} outputs"):
        read_envelope(b"\x32\x00" * (MAX_TENSORS + 1))


def test_the_server_cap_is_the_largest_model_bound_plus_headroom(live):
    from fpt_deploy.serving.grpc_server import MESSAGE_HEADROOM_BYTES, message_limit, server_message_limit

    service, config = live.state.service, live.state.config
    bounds = {c.model: message_limit(c) for c in service.contracts()}
    assert set(bounds) >= set(service.model.tasks)
    cap = server_message_limit(service, config.max_body_bytes)
    assert cap == max(bounds.values()) + MESSAGE_HEADROOM_BYTES < config.max_body_bytes
    assert server_message_limit(service, 2048) == 2048  # never above --max-body-bytes
