"""The Open Inference Protocol (KServe v2) as Triton speaks it: JSON tensors and the binary extension.

A request body is a JSON header, optionally followed by raw tensor bytes: the header's length then
travels in the ``Inference-Header-Content-Length`` HTTP header, and each binary input names its byte
count in ``parameters.binary_data_size``, in input order. Responses mirror this: an output asked for
with ``parameters.binary_data`` (or every output, with the request parameter ``binary_data_output``)
is appended as raw bytes. Binary inputs are decoded with ``np.frombuffer``: no copy of the data.
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from fpt_deploy.serving.errors import MalformedRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"

TRITON_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_TRITON = {v: k for k, v in TRITON_TO_NUMPY.items()}


def triton_dtype(dtype: np.dtype) -> str:
    return NUMPY_TO_TRITON.get(np.dtype(dtype), str(dtype))


@dataclass
class InferRequest:
    """A decoded request: named arrays (read-only views of the body for binary data) and output wishes."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: dict[str, bool] | None = None  # requested output -> binary; None: every output
    binary_default: bool = False  # the request parameter binary_data_output
    parameters: dict = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        if self.outputs is not None and name in self.outputs:
            return self.outputs[name]
        return self.binary_default


def _bad(message: str) -> MalformedRequestError:
    return MalformedRequestError(message)


def _shape(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise _bad(f"{where}: 'shape' must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _json_array(data, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A JSON tensor (flat or nested list, row-major) as an array, checking every value fits ``dtype``."""
    try:
        raw = np.asarray(data)
    except ValueError as e:  # ragged nested lists
        raise _bad(f"{where}: 'data' is not a regular array ({e})") from e
    count = math.prod(shape)
    if raw.size != count:
        raise _bad(f"{where}: 'data' has {raw.size} values but shape {list(shape)} needs {count}")
    if raw.size == 0:
        return np.zeros(shape, dtype)
    if dtype.kind == "b":
        if raw.dtype != np.bool_:
            raise _bad(f"{where}: BOOL data must be true/false")
    elif dtype.kind in "iu":
        if raw.dtype.kind not in "iu":
            raise _bad(f"{where}: {triton_dtype(dtype)} data must be integers, got {raw.dtype.name} values")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise _bad(f"{where}: values must lie in [{info.min}, {info.max}] for {triton_dtype(dtype)}")
    elif raw.dtype.kind not in "iuf":  # floats: ints are fine; NaN/inf parse to floats and are checked later
        raise _bad(f"{where}: {triton_dtype(dtype)} data must be numbers")
    return raw.astype(dtype, copy=False).reshape(shape)


def decode_request(body: bytes | bytearray | memoryview, header_length: str | None) -> InferRequest:
    """Parse an infer request body; ``MalformedRequestError`` (400) says what is wrong with it."""
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(view):
            raise _bad(f"{HEADER_LENGTH} is {n}, but the body has {len(view)} bytes")
        header, binary = view[:n], view[n:]
    try:
        doc = json.loads(bytes(header))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request header is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("the request must be a JSON object with a non-empty 'inputs' list")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("'parameters' must be a JSON object")
    inputs, offset = {}, 0
    for i, spec in enumerate(doc["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad(f"inputs[{i}] must be an object with a string 'name'")
        name = spec["name"]
        where = f"input {name!r}"
        if name in inputs:
            raise _bad(f"{where} appears twice")
        datatype = spec.get("datatype")
        if datatype not in TRITON_TO_NUMPY:
            raise _bad(f"{where}: unsupported datatype {datatype!r}; use one of {', '.join(TRITON_TO_NUMPY)}")
        dtype = TRITON_TO_NUMPY[datatype]
        shape = _shape(spec.get("shape"), where)
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"{where}: 'parameters' must be a JSON object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
            expected = math.prod(shape) * dtype.itemsize
            if size != expected:
                raise _bad(f"{where}: binary_data_size is {size} bytes, but {datatype} {list(shape)} needs {expected}")
            if offset + size > len(binary):
                raise _bad(f"{where}: the body holds {len(binary) - offset} binary bytes for it, not {size}")
            array = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += size
        elif "data" in spec:
            array = _json_array(spec["data"], dtype, shape, where)
        else:
            raise _bad(f"{where} has neither 'data' nor parameters.binary_data_size")
        if dtype.kind == "f" and array.size and not np.isfinite(array).all():
            raise _bad(f"{where} contains NaN or inf")
        inputs[name] = array
    if offset != len(binary):
        raise _bad(f"the body has {len(binary) - offset} binary bytes that no input claims")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' must be a list")
        outputs = {}
        for j, out in enumerate(doc["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad(f"outputs[{j}] must be an object with a string 'name'")
            out_params = out.get("parameters") or {}
            if not isinstance(out_params, dict):
                raise _bad(f"outputs[{j}]: 'parameters' must be a JSON object")
            outputs[out["name"]] = bool(out_params.get("binary_data", parameters.get("binary_data_output", False)))
    request_id = doc.get("id")
    return InferRequest(
        inputs,
        str(request_id) if request_id is not None else None,
        outputs,
        bool(parameters.get("binary_data_output", False)),
        parameters,
    )


def encode_response(
    model: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]], version: str = "1"
) -> tuple[bytes, int | None]:
    """(body, header length or None): JSON outputs inline, binary ones appended after the JSON header."""
    tensors, chunks = [], []
    for name, array, binary in outputs:
        entry = {"name": name, "datatype": triton_dtype(array.dtype), "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
