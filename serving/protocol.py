"""The Open Inference Protocol (KServe v2) as Triton speaks it: JSON tensors and the binary extension.

A request body is a JSON header, optionally followed by raw tensor bytes: the header's length then
travels in the ``Inference-Header-Content-Length`` HTTP header, and each binary input names its byte
count in ``parameters.binary_data_size``, in input order. Responses mirror this: an output asked for
with ``parameters.binary_data`` (or every output, with the request parameter ``binary_data_output``)
is appended as raw bytes. Binary inputs are decoded with ``np.frombuffer``: no copy of the data.
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md

Decoding is ONE validated path shared by every transport (HTTP here, gRPC too): ``validate_inputs``
turns a model's ``InputContract`` and the tensors a client declared (name, datatype, shape, and either
JSON values or raw bytes) into the input array. What a client declared is checked against the contract
(``check_declared``) before any data is touched, so a shape of 38,000 rows or 2**70 elements is refused
from its header alone. JSON is parsed under ``JsonLimits`` (nesting depth, characters per number), and
types are strict as in Triton: booleans are JSON booleans, and integer tensors hold integers, never
``true``. Every refusal is a ``MalformedRequestError`` or ``InvalidInputError`` (400) naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from fpt_deploy.serving.errors import InvalidInputError, MalformedRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_VERSION = "1"  # the one version of every served model

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
# Room in a request body besides the tensor data: the JSON around it, names, id and parameters.
JSON_ENVELOPE_BYTES = 16 << 10
# Room per JSON value besides its digits: a separator and the whitespace of a pretty-printed nested list.
JSON_SEPARATOR_BYTES = 24
# Without a contract (generic decoding), a declared shape may not hold more elements than this.
MAX_GENERIC_ELEMENTS = 1 << 31


def triton_dtype(dtype: np.dtype) -> str:
    return NUMPY_TO_TRITON.get(np.dtype(dtype), str(dtype))


@dataclass(frozen=True, kw_only=True)
class JsonLimits:
    """Bounds on the JSON of a request, checked by a byte scan before the parser sees it."""

    max_depth: int = 32  # nested arrays and objects; a request needs about 4 plus its tensor rank
    max_number_chars: int = 64  # digits, sign, point and exponent of one number


@dataclass(frozen=True, kw_only=True)
class InputContract:
    """What a model accepts: one input ``name`` of ``dtype``, shape [rows, *example_shape], 1 <= rows <= max_rows."""

    model: str
    name: str
    dtype: np.dtype
    example_shape: tuple[int, ...]
    max_rows: int

    @classmethod
    def of(cls, task, max_rows: int) -> InputContract:
        """The contract of a loaded task (``name``, ``input_name``, ``input_dtype``, ``example_shape``)."""
        return cls(
            model=task.name,
            name=task.input_name,
            dtype=np.dtype(task.input_dtype),
            example_shape=tuple(task.example_shape),
            max_rows=max_rows,
        )

    @classmethod
    def of_artifact(cls, art, max_rows: int) -> InputContract:
        """The contract of a task the repository lists (a ``TaskArtifact``), loaded or not."""
        return cls(
            model=art.name,
            name=art.input["name"],
            dtype=np.dtype(art.input["dtype"]),
            example_shape=tuple(art.input["shape"][1:]),
            max_rows=max_rows,
        )

    @property
    def datatype(self) -> str:
        return triton_dtype(self.dtype)

    @property
    def max_elements(self) -> int:
        """Elements of the largest valid input: ``max_rows`` rows."""
        return self.max_rows * math.prod(self.example_shape)

    def describe(self) -> str:
        return f"{self.datatype} [-1, {', '.join(map(str, self.example_shape))}]"

    def max_body_bytes(self, limits: JsonLimits) -> int:
        """The largest body a valid request can have: ``max_rows`` rows as JSON values (binary is smaller)."""
        return JSON_ENVELOPE_BYTES + self.max_elements * (limits.max_number_chars + JSON_SEPARATOR_BYTES)


@dataclass(frozen=True, kw_only=True)
class DeclaredTensor:
    """One input as a client declared it, before validation: any transport builds these.

    ``data`` holds JSON-like values (flat or nested lists, row-major); ``values`` a flat array already
    converted from typed fields (gRPC's typed contents); ``raw`` holds little-endian row-major bytes
    (the binary extension, gRPC's raw contents).
    ``field`` names the tensor in error messages, e.g. ``inputs[0]``.
    """

    name: object
    datatype: object
    shape: object
    data: object = None
    raw: bytes | bytearray | memoryview | None = None
    values: np.ndarray | None = None
    field: str = "inputs[0]"
    may_hold_booleans: bool = True  # False when the source cannot hold booleans (a scan found none)


@dataclass
class InferRequest:
    """A decoded request: named arrays (read-only views of the body for binary data) and output wishes."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: dict[str, bool] | None = None  # requested output -> binary; None: every output
    binary_default: bool = False  # the request parameter binary_data_output
    parameters: dict = field(default_factory=dict)
    output_parameters: dict[str, dict] = field(default_factory=dict)  # requested output -> its parameters

    def wants_binary(self, name: str) -> bool:
        if self.outputs is not None and name in self.outputs:
            return self.outputs[name]
        return self.binary_default


def _bad(message: str) -> MalformedRequestError:
    return MalformedRequestError(message)


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a large input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- JSON under limits -------------------------------------------------------------------------------

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_IS_NUMBER = np.zeros(256, np.bool_)
_IS_NUMBER[list(b"0123456789+-.eE")] = True
_NUMBER_RUNS = bytes(ord("n") if _IS_NUMBER[c] else ord(" ") for c in range(256))  # for bytes.translate
_STEP = np.zeros(256, np.int8)  # +1 opens an array or object, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def _string_quotes(a: np.ndarray) -> np.ndarray:
    """Positions of the quotes that open or close JSON strings: those after an even run of backslashes."""
    quotes = np.flatnonzero(a == _QUOTE)
    if quotes.size == 0 or not (a == _BACKSLASH).any():
        return quotes
    others = np.flatnonzero(a != _BACKSLASH)
    k = np.searchsorted(others, quotes) - 1  # the last byte before each quote that is not a backslash
    last = np.where(k >= 0, others[np.maximum(k, 0)], -1)
    return quotes[(quotes - 1 - last) % 2 == 0]


def scan_json(text: bytes, limits: JsonLimits) -> None:
    """Check the nesting depth and the number lengths of ``text`` without parsing it.

    A handful of vectorised passes (linear in the text, no backtracking, no Python loop per token):
    brackets and number characters inside strings are left out, so names and ids never count. A
    100,000-deep nest or a 5,000-digit integer is refused before the recursive parser sees it.
    """
    a = np.frombuffer(text, np.uint8)
    quotes = None

    def outside_strings(positions: np.ndarray) -> np.ndarray:
        nonlocal quotes
        quotes = _string_quotes(a) if quotes is None else quotes
        # outside a string: after an even number of string quotes
        return positions[np.searchsorted(quotes, positions) % 2 == 0] if quotes.size else positions

    brackets = np.flatnonzero(_STEP[a])
    if brackets.size > limits.max_depth:
        brackets = outside_strings(brackets)
        if int(np.cumsum(_STEP[a[brackets]], dtype=np.int32).max(initial=0)) > limits.max_depth:
            raise _bad(f"the request nests arrays or objects more than {limits.max_depth} deep")
    if b"n" * (limits.max_number_chars + 1) in text.translate(_NUMBER_RUNS):  # a long run somewhere: where?
        digits = outside_strings(np.flatnonzero(_IS_NUMBER[a]))
        breaks = np.flatnonzero(np.diff(digits) != 1)  # where one run of number characters ends
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [digits.size - 1]))
        if digits.size and int((digits[ends] - digits[starts]).max()) + 1 > limits.max_number_chars:
            raise _bad(f"a number in the request has more than {limits.max_number_chars} characters")


def utf8_text(text: bytes) -> str:
    """``text`` decoded as UTF-8, the only encoding of exchanged JSON (RFC 8259 section 8.1); else 400.

    ``json.loads`` would guess UTF-16 or UTF-32 from the first bytes, while the byte scans of
    ``scan_json`` and the boolean check read UTF-8: every transport decodes here first, so the parser
    and the scans see the same text. JSON never holds a NUL byte (control characters in strings are
    escaped), while UTF-16 and UTF-32 text of ASCII characters is full of them.
    """
    if b"\0" in text:
        raise _bad(
            "the request JSON must be UTF-8 (RFC 8259); it holds NUL bytes, as UTF-16 or UTF-32 text does: "
            "send it as UTF-8"
        )
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(
            f"the request JSON must be UTF-8 (RFC 8259); byte {e.start} ({text[e.start : e.start + 1]!r}) "
            "starts no UTF-8 character: send it as UTF-8"
        ) from None


def parse_json(text: bytes, limits: JsonLimits) -> tuple[object, bool]:
    """(document, whether it may hold booleans) of ``text``, parsed under ``limits``; 400 if it is not
    UTF-8 JSON."""
    decoded = utf8_text(text)
    scan_json(text, limits)
    try:
        doc = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise _bad(f"the request header is not valid JSON ({e})") from None
    except (RecursionError, ValueError) as e:  # guarded by the scan; kept so no parser limit becomes a 500
        raise _bad(f"the request header is not acceptable JSON ({type(e).__name__})") from None
    return doc, (b"true" in text or b"false" in text)  # also inside strings: then the exact check runs


# -- the one validated path --------------------------------------------------------------------------


def _shape(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _bad(f"{where}.shape must be a list of non-negative integers, got {_short(value)}")
    return tuple(value)


def _dtype(value, where: str) -> np.dtype:
    if not isinstance(value, str) or value not in TRITON_TO_NUMPY:
        raise _bad(f"{where}.datatype: unsupported datatype {_short(value)}; use one of {', '.join(TRITON_TO_NUMPY)}")
    return TRITON_TO_NUMPY[value]


def check_declared(contract: InputContract | None, tensors: Sequence[DeclaredTensor]) -> list[tuple[np.dtype, tuple]]:
    """(dtype, shape) of each declared tensor, checked against ``contract`` before any data is read.

    With a contract: exactly one input, of its name and datatype, shaped [rows, *example_shape] with
    1 <= rows <= max_rows. Without one (generic decoding): valid datatypes and bounded shapes.
    """
    if contract is not None and len(tensors) != 1:
        names = ", ".join(_short(t.name, 40) for t in tensors[:8])
        raise InvalidInputError(
            f"model {contract.model!r} takes one input, {contract.name!r} ({contract.describe()}); "
            f"got {len(tensors)}: {names}"
        )
    declared, seen = [], set()
    for t in tensors:
        if not isinstance(t.name, str):
            raise _bad(f"{t.field}.name must be a string, got {_short(t.name)}")
        if t.name in seen:
            raise _bad(f"{t.field}: input {t.name!r} appears twice")
        seen.add(t.name)
        where = f"{t.field} ({t.name!r})"
        if contract is not None and t.name != contract.name:
            raise InvalidInputError(
                f"{t.field}.name: model {contract.model!r} has one input, {contract.name!r} "
                f"({contract.describe()}); got {_short(t.name, 40)}"
            )
        dtype = _dtype(t.datatype, where)
        shape = _shape(t.shape, where)
        if contract is None:
            if math.prod(d for d in shape if d) > MAX_GENERIC_ELEMENTS:
                raise _bad(f"{where}.shape {_short(list(shape))} declares more than {MAX_GENERIC_ELEMENTS} elements")
        else:
            where = f"{t.field}: input {t.name!r} of model {contract.model!r}"
            if dtype != contract.dtype:
                raise InvalidInputError(f"{where} must be {contract.datatype}, got {t.datatype}")
            if len(shape) != 1 + len(contract.example_shape) or shape[1:] != contract.example_shape:
                raise InvalidInputError(
                    f"{where} must have shape {contract.describe().split(' ', 1)[1]}, got {_short(list(shape))}"
                )
            if not 1 <= shape[0] <= contract.max_rows:
                raise InvalidInputError(
                    f"{where} must have between 1 and {contract.max_rows} rows (max batch size), "
                    f"got {shape[0]}; split the request"
                )
        declared.append((dtype, shape))
    return declared


def _contains_bool(data) -> bool:
    flat = np.asarray(data, dtype=object).reshape(-1)
    return any(type(v) is bool for v in flat)


def _json_array(data, dtype: np.dtype, shape: tuple[int, ...], where: str, may_hold_booleans: bool) -> np.ndarray:
    """A JSON tensor (flat or nested list, row-major) as an array of exactly ``dtype``, strict as Triton."""
    if not isinstance(data, list | tuple):
        raise _bad(f"{where}.data must be a list, got {_short(data)}")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):  # ragged nested lists
        raise _bad(f"{where}.data is not a regular array (nested lists of unequal lengths)") from None
    count = math.prod(shape)
    if raw.size != count:
        raise _bad(f"{where}.data has {raw.size} values but shape {list(shape)} needs {count}")
    if raw.size == 0:
        return np.zeros(shape, dtype)
    name = triton_dtype(dtype)
    if dtype.kind == "b":
        if raw.dtype != np.bool_:
            raise _bad(f"{where}.data: BOOL data must be JSON booleans (true/false)")
    elif raw.dtype.kind == "b" or (raw.dtype.kind in "iuf" and may_hold_booleans and _contains_bool(data)):
        raise _bad(f"{where}.data: {name} data must be numbers, not booleans (true/false)")
    elif dtype.kind in "iu":
        if raw.dtype.kind not in "iu":
            raise _bad(f"{where}.data: {name} data must be integers in range, got {raw.dtype.name} values")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise _bad(f"{where}.data: values must lie in [{info.min}, {info.max}] for {name}")
    elif raw.dtype.kind not in "iuf":  # floats: ints are fine; NaN/inf parse to floats and are checked below
        raise _bad(f"{where}.data: {name} data must be numbers")
    return raw.astype(dtype, copy=False).reshape(shape)


def _typed_array(values: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A flat array of typed values (a wider type of the same kind, e.g. uint32 for UINT8) as ``dtype``."""
    count = math.prod(shape)
    if values.size != count:
        raise _bad(f"{where} has {values.size} values but shape {list(shape)} needs {count}")
    if dtype.kind in "iu" and values.size and values.dtype != dtype:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise _bad(f"{where}: values must lie in [{info.min}, {info.max}] for {triton_dtype(dtype)}")
    return values.astype(dtype, copy=False).reshape(shape)


def decode_tensor(tensor: DeclaredTensor, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a tensor whose declaration ``check_declared`` accepted as (``dtype``, ``shape``)."""
    where = f"{tensor.field} ({tensor.name!r})"
    if tensor.raw is not None:
        expected = math.prod(shape) * dtype.itemsize
        if len(tensor.raw) != expected:
            raise _bad(
                f"{where}: {len(tensor.raw)} bytes of data, but {triton_dtype(dtype)} {list(shape)} needs {expected}"
            )
        array = np.frombuffer(tensor.raw, dtype=dtype.newbyteorder("<"), count=math.prod(shape)).reshape(shape)
        array = array if array.dtype == dtype else array.astype(dtype)
    elif tensor.values is not None:
        array = _typed_array(tensor.values, dtype, shape, where)
    elif tensor.data is not None:
        array = _json_array(tensor.data, dtype, shape, where, tensor.may_hold_booleans)
    else:
        raise _bad(f"{where} has neither 'data' nor parameters.binary_data_size")
    if dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise _bad(f"{where} contains NaN or inf")
    return array


def validate_inputs(contract: InputContract | None, tensors: Sequence[DeclaredTensor]) -> dict[str, np.ndarray]:
    """The validated input arrays of ``tensors`` (transport-independent): declarations first, then data."""
    declared = check_declared(contract, tensors)
    return {t.name: decode_tensor(t, dtype, shape) for t, (dtype, shape) in zip(tensors, declared, strict=True)}


# -- HTTP/JSON requests ------------------------------------------------------------------------------


def _flag(params: dict, key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{where}.{key} must be a JSON boolean (true/false), got {_short(value)}")
    return value


def _object(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a JSON object, got {_short(value)}")
    return value


def split_body(body: bytes | bytearray | memoryview, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(JSON header, binary data) of a body; without ``Inference-Header-Content-Length`` all of it is JSON."""
    view = memoryview(body)
    if header_length is None:
        return view, view[:0]
    if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 18:
        raise _bad(f"{HEADER_LENGTH} must be an integer (the JSON header's bytes), got {_short(header_length)}")
    n = int(header_length)
    if not 0 < n <= len(view):
        raise _bad(f"{HEADER_LENGTH} is {n}, but the body has {len(view)} bytes")
    return view[:n], view[n:]


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: str | None,
    contract: InputContract | None = None,
    limits: JsonLimits = JsonLimits(),  # noqa: B008  (frozen)
) -> InferRequest:
    """Parse and validate an infer request body; ``MalformedRequestError``/``InvalidInputError`` (400) say why."""
    header, binary = split_body(body, header_length)
    doc, may_hold_booleans = parse_json(bytes(header), limits)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("the request must be a JSON object with a non-empty 'inputs' list")
    parameters = _object(doc.get("parameters"), "parameters")
    specs = doc["inputs"]
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise _bad(f"inputs[{i}] must be a JSON object, got {_short(spec)}")
    tensors = [
        DeclaredTensor(
            name=spec.get("name"),
            datatype=spec.get("datatype"),
            shape=spec.get("shape"),
            data=spec.get("data"),
            field=f"inputs[{i}]",
            may_hold_booleans=may_hold_booleans,
        )
        for i, spec in enumerate(specs)
    ]
    declared = check_declared(contract, tensors)  # every declaration before any data
    offset = 0
    for i, (spec, (dtype, shape)) in enumerate(zip(specs, declared, strict=True)):
        params = _object(spec.get("parameters"), f"inputs[{i}].parameters")
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in spec:
                raise _bad(f"inputs[{i}] ({spec['name']!r}) has neither 'data' nor parameters.binary_data_size")
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"inputs[{i}].parameters.binary_data_size must be a non-negative integer, got {_short(size)}")
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise _bad(
                f"inputs[{i}].parameters.binary_data_size is {size} bytes, "
                f"but {triton_dtype(dtype)} {list(shape)} needs {expected}"
            )
        if offset + size > len(binary):
            raise _bad(f"inputs[{i}]: the body holds {len(binary) - offset} binary bytes for it, not {size}")
        tensors[i] = DeclaredTensor(
            name=spec["name"],
            datatype=spec["datatype"],
            shape=shape,
            raw=binary[offset : offset + size],
            field=f"inputs[{i}]",
        )
        offset += size
    if offset != len(binary):
        raise _bad(f"the body has {len(binary) - offset} binary bytes that no input claims")
    binary_default = _flag(parameters, "binary_data_output", "parameters", False)
    outputs, output_parameters = None, {}
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise _bad(f"'outputs' must be a list, got {_short(doc['outputs'])}")
        outputs = {}
        for j, out in enumerate(doc["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad(f"outputs[{j}] must be an object with a string 'name'")
            out_params = _object(out.get("parameters"), f"outputs[{j}].parameters")
            outputs[out["name"]] = _flag(out_params, "binary_data", f"outputs[{j}].parameters", binary_default)
            output_parameters[out["name"]] = out_params
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"'id' must be a string, got {_short(request_id)}")
    # the data last: every cheap check of the header has passed
    inputs = {t.name: decode_tensor(t, dtype, shape) for t, (dtype, shape) in zip(tensors, declared, strict=True)}
    return InferRequest(inputs, request_id, outputs, binary_default, parameters, output_parameters)


def encode_response(
    model: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]], version: str = MODEL_VERSION
) -> tuple[bytes, int | None]:
    """(body, header length or None): JSON outputs inline, binary ones appended after the JSON header."""
    tensors, chunks = [], []
    for name, array, binary in outputs:
        strings = array.dtype == object  # BYTES (classification's "score:index:label"): bytes elements
        datatype = "BYTES" if strings else triton_dtype(array.dtype)
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if strings:  # each element: its length as 4 little-endian bytes, then the bytes (Triton's layout)
                data = b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1).tolist())
            else:
                data = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            flat = array.reshape(-1).tolist()
            entry["data"] = [b.decode() for b in flat] if strings else flat
        tensors.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
