"""Open Inference Protocol decoding and encoding, checked against what tritonclient itself sends and reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fpt_deploy.serving.errors import MalformedRequestError
from fpt_deploy.serving.protocol import decode_request, encode_response


def triton_body(arrays: dict[str, np.ndarray], binary: bool, outputs=None):
    """The exact body and header tritonclient.http builds for ``arrays``."""
    import tritonclient.http as httpclient
    from tritonclient.http._utils import _get_inference_request
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in (outputs or [])]
    return _get_inference_request(inputs, "7", requested or None, 0, False, False, 0, None, None)


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_what_tritonclient_sends(binary):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    body, header_length = triton_body({"input": x, "f": f}, binary, [("logits", True), ("labels", False)])
    assert (header_length is not None) == binary
    request = decode_request(body, None if header_length is None else str(header_length))
    np.testing.assert_array_equal(request.inputs["input"], x)
    np.testing.assert_array_equal(request.inputs["f"], f)
    assert request.inputs["input"].dtype == np.uint8 and request.inputs["f"].dtype == np.float32
    assert request.id == "7" and request.outputs == {"logits": True, "labels": False}


def test_binary_inputs_are_views_of_the_body():
    x = np.ones((4, 10), np.uint8)
    body, n = triton_body({"input": x}, True)
    buffer = bytearray(body)
    request = decode_request(buffer, str(n))
    assert np.shares_memory(request.inputs["input"], np.frombuffer(buffer, np.uint8))


def test_response_reads_back_with_tritonclient():
    from tritonclient.http import InferResult

    logits = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    labels = logits.argmax(-1)
    body, n = encode_response("mnist", "7", [("logits", logits, True), ("labels", labels, False)])
    result = InferResult.from_response_body(body, header_length=n)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("labels"), labels)
    assert result.get_response()["id"] == "7"
    body, n = encode_response("mnist", None, [("labels", labels, False)])
    assert n is None and json.loads(body)["outputs"][0]["data"] == labels.tolist()


@pytest.mark.parametrize(
    "body, header, message",
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"inputs": []}', None, "non-empty 'inputs' list"),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            None,
            "unsupported datatype 'BYTES'",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}]}',
            None,
            "has 1 values but shape",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, 300]}]}',
            None,
            r"values must lie in \[0, 255\]",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1.5]}]}', None, "must be integers"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, NaN]}]}', None, "NaN or inf"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [Infinity]}]}', None, "NaN or inf"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data' nor"),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}]}ab',
            "auto-2",
            "holds 2 binary bytes",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 3}}]}abc',
            "auto-3",
            "needs 4",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}', "9999", "body has"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}', "ten", "must be an integer"),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}xyz',
            "auto-3",
            "no input claims",
        ),
    ],
)
def test_malformed_requests_say_what_is_wrong(body, header, message):
    if header and header.startswith("auto-"):  # the JSON header is all but the last N bytes
        header = str(len(body) - int(header[5:]))
    with pytest.raises(MalformedRequestError, match=message):
        decode_request(body, header)
