"""TEST DOUBLE of the ``tensorrt`` and ``cuda.bindings.runtime`` modules, for the TensorRT contract tests only.

Never imported by the package: the tests put ``DoubleTensorRT`` and ``DoubleCudart`` into
``sys.modules`` under the real names, so the REAL build code and the REAL serving runtime
(``fpt_deploy.serving.runtimes.tensorrt``) run against them on a machine without a GPU.

What the double models, so that a wrong call fails as it would on a GPU:

- device memory: ``cudaMalloc`` hands out fake addresses backed by host bytes; reads and writes are
  bounds-checked against the allocation; ``cudaFree`` of an unknown or freed address is an error;
- streams: ``cudaMemcpyAsync`` and ``execute_async_v3`` only QUEUE work; it runs, in order, at
  ``cudaStreamSynchronize`` (so a missing synchronise leaves the output unwritten, and memory freed
  while work is queued is caught as a violation);
- the engine: its "serialized plan" is the ONNX graph the builder parsed, tagged as a double; running
  it executes that graph in ONNX Runtime on the bytes at the bound addresses, with the shapes set on
  the context, checked against the optimisation profile.

Every call is recorded (``DoubleCudart.calls``), and contract breaches are collected in
``DoubleCudart.violations`` rather than raised, so a test can assert on them after the fact.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import types
from pathlib import Path

import numpy as np

DOUBLE_PLAN_MAGIC = b"FPT-TEST-DOUBLE-TENSORRT-PLAN\n"


# --- cuda.bindings.runtime ----------------------------------------------------------------------------


class cudaError_t(enum.IntEnum):  # noqa: N801  (the real module's name)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


_ERROR_TEXT = {
    cudaError_t.cudaSuccess: b"no error",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: b"out of memory",
    cudaError_t.cudaErrorInsufficientDriver: b"CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle",
}


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class DoubleStream(int):
    """A stream handle (cuda-python's ``cudaStream_t`` converts with ``int()`` too)."""


class DoubleCudart(types.ModuleType):
    """TEST DOUBLE of ``cuda.bindings.runtime``: fake device memory, queued streams, every call recorded."""

    IS_TEST_DOUBLE = True
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind

    def __init__(self, device_count_error: cudaError_t = cudaError_t.cudaSuccess) -> None:
        super().__init__("cuda.bindings.runtime")
        self.device_count_error = device_count_error
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self.allocations: dict[int, bytearray] = {}  # live: base address -> bytes
        self.freed: list[int] = []
        self.streams: dict[int, list] = {}  # live: handle -> queued work
        self.destroyed_streams: list[int] = []
        self.fail_free: set[int] = set()  # addresses whose cudaFree reports an error (once)
        self.sync_entered = threading.Event()  # set when a synchronise starts running its queue
        self.sync_gate: threading.Event | None = None  # when set by a test, synchronise waits for it
        self._next = 0x7F0000000000

    # memory
    def _locate(self, ptr: int, nbytes: int, what: str) -> memoryview | None:
        for base, buf in self.allocations.items():
            if base <= ptr < base + len(buf):
                if ptr + nbytes > base + len(buf):
                    self.violations.append(f"{what}: {nbytes} bytes at {ptr:#x} overrun an allocation of {len(buf)}")
                    return None
                return memoryview(buf)[ptr - base : ptr - base + nbytes]
        self.violations.append(f"{what}: {ptr:#x} is not live device memory (never allocated, or freed)")
        return None

    def read(self, ptr: int, nbytes: int, what: str) -> bytes | None:
        view = self._locate(ptr, nbytes, what)
        return None if view is None else bytes(view)

    def write(self, ptr: int, data: bytes, what: str) -> None:
        view = self._locate(ptr, len(data), what)
        if view is not None:
            view[:] = data

    def _pending(self, base: int, size: int) -> bool:
        return any(base <= p < base + size for work in self.streams.values() for op in work for p in op[1])

    # the real module's functions (each returns a tuple whose first item is a cudaError_t)
    def cudaGetErrorName(self, err):  # noqa: N802
        return cudaError_t.cudaSuccess, cudaError_t(err).name.encode()

    def cudaGetErrorString(self, err):  # noqa: N802
        return cudaError_t.cudaSuccess, _ERROR_TEXT[cudaError_t(err)]

    def cudaGetDeviceCount(self):  # noqa: N802
        self.calls.append(("cudaGetDeviceCount",))
        if self.device_count_error:
            return self.device_count_error, 0
        return cudaError_t.cudaSuccess, 1

    def cudaGetDevice(self):  # noqa: N802
        return cudaError_t.cudaSuccess, 0

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=b"TEST DOUBLE GPU\x00\x00", major=9, minor=0)

    def cudaMalloc(self, nbytes):  # noqa: N802
        self.calls.append(("cudaMalloc", nbytes))
        ptr, self._next = self._next, self._next + ((nbytes + 0xFFF) // 0x1000 + 1) * 0x1000
        self.allocations[ptr] = bytearray(nbytes)
        return cudaError_t.cudaSuccess, ptr

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("cudaFree", ptr))
        if ptr not in self.allocations:
            self.violations.append(f"cudaFree({ptr:#x}): not a live allocation (double free?)")
            return (cudaError_t.cudaErrorInvalidValue,)
        if self._pending(ptr, len(self.allocations[ptr])):
            self.violations.append(f"cudaFree({ptr:#x}) while queued work on a stream still uses it")
        del self.allocations[ptr]
        self.freed.append(ptr)
        if ptr in self.fail_free:
            self.fail_free.discard(ptr)
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):  # noqa: N802
        self.calls.append(("cudaStreamCreate",))
        handle = DoubleStream(0x5000 + len(self.streams) + len(self.destroyed_streams) + 1)
        self.streams[int(handle)] = []
        return cudaError_t.cudaSuccess, handle

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamDestroy", int(stream)))
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if self.streams.pop(int(stream)):
            self.violations.append("cudaStreamDestroy with work still queued")
        self.destroyed_streams.append(int(stream))
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        self.calls.append(("cudaMemcpyAsync", cudaMemcpyKind(kind).name, nbytes, int(stream)))
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        device = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
        self.streams[int(stream)].append(("memcpy", (device,), (dst, src, nbytes, kind)))
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, stream: int, device_ptrs: tuple[int, ...], run) -> bool:
        if int(stream) not in self.streams:
            self.violations.append(f"work queued on stream {int(stream):#x}, which does not exist")
            return False
        self.streams[int(stream)].append(("call", device_ptrs, run))
        return True

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamSynchronize", int(stream)))
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.sync_entered.set()
        if self.sync_gate is not None:
            self.sync_gate.wait()
        work = self.streams[int(stream)]
        while work:
            kind, _, args = work[0]
            if kind == "memcpy":
                dst, src, nbytes, direction = args
                if direction == cudaMemcpyKind.cudaMemcpyHostToDevice:
                    self.write(dst, ctypes.string_at(src, nbytes), "cudaMemcpyAsync H2D")
                else:
                    data = self.read(src, nbytes, "cudaMemcpyAsync D2H")
                    if data is not None:
                        ctypes.memmove(dst, data, nbytes)
            else:
                args()
            work.pop(0)
        return (cudaError_t.cudaSuccess,)


class RecordingCudart(types.ModuleType):
    """TEST DOUBLE wrapper of the REAL ``cuda.bindings.runtime`` (GPU machines): every call goes to CUDA.

    It records allocations, frees and streams with the same bookkeeping as ``DoubleCudart``, and lets
    the double's engine read and write real device memory (synchronous copies after the stream's
    queued work), so the runtime's buffers, copies and streams run on a real GPU and driver.
    """

    IS_TEST_DOUBLE = True

    def __init__(self, real) -> None:
        super().__init__("cuda.bindings.runtime")
        self._real = real
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self.allocations: dict[int, int] = {}
        self.freed: list[int] = []
        self.streams: dict[int, list] = {}
        self.destroyed_streams: list[int] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def cudaMalloc(self, nbytes):  # noqa: N802
        self.calls.append(("cudaMalloc", nbytes))
        result = self._real.cudaMalloc(nbytes)
        if int(result[0]) == 0:
            self.allocations[int(result[1])] = nbytes
        return result

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("cudaFree", ptr))
        if self.allocations.pop(int(ptr), None) is None:
            self.violations.append(f"cudaFree({int(ptr):#x}): not a live allocation (double free?)")
        else:
            self.freed.append(int(ptr))
        return self._real.cudaFree(ptr)

    def cudaStreamCreate(self):  # noqa: N802
        self.calls.append(("cudaStreamCreate",))
        result = self._real.cudaStreamCreate()
        if int(result[0]) == 0:
            self.streams[int(result[1])] = []
        return result

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamDestroy", int(stream)))
        self.streams.pop(int(stream), None)
        self.destroyed_streams.append(int(stream))
        return self._real.cudaStreamDestroy(stream)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        self.calls.append(("cudaMemcpyAsync", cudaMemcpyKind(int(kind)).name, nbytes, int(stream)))
        return self._real.cudaMemcpyAsync(dst, src, nbytes, kind, stream)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamSynchronize", int(stream)))
        return self._real.cudaStreamSynchronize(stream)

    # what the double's engine uses to reach device memory
    def _copy(self, dst, src, nbytes, kind, what) -> bool:
        (err,) = self._real.cudaMemcpy(dst, src, nbytes, kind)
        if int(err) != 0:
            self.violations.append(f"{what}: cudaMemcpy failed ({err})")
        return int(err) == 0

    def read(self, ptr: int, nbytes: int, what: str) -> bytes | None:
        host = np.empty(nbytes, np.uint8)
        kind = self._real.cudaMemcpyKind.cudaMemcpyDeviceToHost
        return host.tobytes() if self._copy(host.ctypes.data, ptr, nbytes, kind, what) else None

    def write(self, ptr: int, data: bytes, what: str) -> None:
        host = np.frombuffer(data, np.uint8).copy()
        self._copy(ptr, host.ctypes.data, len(data), self._real.cudaMemcpyKind.cudaMemcpyHostToDevice, what)

    def enqueue(self, stream: int, device_ptrs: tuple[int, ...], run) -> bool:
        self._real.cudaStreamSynchronize(stream)  # the inputs copied before the launch have landed
        run()
        return True


# --- tensorrt -------------------------------------------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT32 = np.int32
    INT64 = np.int64
    BOOL = np.bool_


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class LayerType(enum.Enum):
    OTHER = 0
    NORMALIZATION = 1


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DoubleILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


def _inferred(model) -> dict[str, tuple[DataType, list]]:
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    out = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out[v.name] = (_ONNX_TO_TRT.get(t.elem_type, DataType.FLOAT), dims)
    out.update({i.name: (_ONNX_TO_TRT.get(i.data_type, DataType.FLOAT), list(i.dims)) for i in g.initializer})
    return out


class _Tensor:
    def __init__(self, name: str, dtype: DataType) -> None:
        self.name, self.dtype = name, dtype


class _Layer:
    def __init__(self, node, types: dict) -> None:
        self.name = node.name
        self.type = LayerType.NORMALIZATION if node.op_type == "LayerNormalization" else LayerType.OTHER
        self._inputs = [_Tensor(n, types[n][0]) if n in types else None for n in node.input]
        self._outputs = [_Tensor(n, types.get(n, (DataType.FLOAT,))[0]) for n in node.output]
        self.num_inputs = len(self._inputs)

    def get_input(self, k):
        return self._inputs[k]

    def get_output(self, k):
        return self._outputs[k]


class DoubleNetwork:
    def __init__(self, flags: int) -> None:
        self.flags, self.model, self.layers, self.inputs = flags, None, [], []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class DoubleOnnxParser:
    def __init__(self, network: DoubleNetwork, logger) -> None:
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        types_ = _inferred(model)
        self.network.model = model
        self.network.inputs = [_Tensor(i.name, types_[i.name][0]) for i in model.graph.input]
        self.network.layers = [_Layer(n, types_) for n in model.graph.node]
        return True


class DoubleProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class DoubleBuilderConfig:
    def __init__(self) -> None:
        self.profiles, self.pool_limits, self.cleared = [], {}, []

    def set_memory_pool_limit(self, pool, nbytes) -> None:
        self.pool_limits[pool] = nbytes

    def clear_flag(self, flag) -> None:
        self.cleared.append(flag)

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class DoubleEngine:
    """The double's ICudaEngine: the parsed ONNX, its tensors, one optimisation profile."""

    def __init__(self, module: DoubleTensorRT, onnx_bytes: bytes, profile: dict) -> None:
        import onnx

        self.module, self.onnx_bytes = module, onnx_bytes
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in profile.items()}
        model = onnx.load_from_string(onnx_bytes)
        types_ = _inferred(model)
        self.inputs = [i.name for i in model.graph.input]
        self.outputs = [o.name for o in model.graph.output]
        self.dtypes = {n: types_[n][0] for n in (*self.inputs, *self.outputs)}
        self.hidden_size = int(types_[self.outputs[0]][1][-1])

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i: int) -> str:
        return [*self.inputs, *self.outputs][i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0, "the double's engines hold one profile"
        return [list(s) for s in self.profile[name]]

    def create_execution_context(self):
        return DoubleContext(self)


class DoubleContext:
    """The double's IExecutionContext: shapes and addresses as set, run in ONNX Runtime on the stream's turn."""

    def __init__(self, engine: DoubleEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.cudart = engine.module.cudart

    def set_input_shape(self, name, shape) -> bool:
        self.cudart.calls.append(("set_input_shape", name, tuple(shape)))
        if name not in self.engine.inputs:
            return False
        lo, _, hi = self.engine.profile[name]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        self.cudart.calls.append(("set_tensor_address", name, int(ptr)))
        if name not in self.engine.inputs and name not in self.engine.outputs:
            return False
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return list(self.shapes.get(name, ()))
        B, L, _ = self.shapes.get("hidden", (0, 0, 0))
        return [B, L, self.engine.hidden_size]

    def execute_async_v3(self, stream) -> bool:
        self.cudart.calls.append(("execute_async_v3", int(stream)))
        missing = [n for n in self.engine.inputs if n not in self.shapes] + [
            n for n in (*self.engine.inputs, *self.engine.outputs) if n not in self.addresses
        ]
        if missing:
            self.cudart.violations.append(f"execute_async_v3 before shapes/addresses of {missing} were set")
            return False
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what this launch captured
        return self.cudart.enqueue(int(stream), tuple(addresses.values()), lambda: self._run(shapes, addresses))

    def _run(self, shapes: dict, addresses: dict) -> None:
        import onnxruntime as ort

        feeds = {}
        for name in self.engine.inputs:
            dtype = np.dtype(self.engine.dtypes[name].value)
            nbytes = int(np.prod(shapes[name])) * dtype.itemsize
            data = self.cudart.read(addresses[name], nbytes, f"engine input {name}")
            if data is None:
                return
            feeds[name] = np.frombuffer(data, dtype).reshape(shapes[name])
        session = ort.InferenceSession(self.engine.onnx_bytes, providers=["CPUExecutionProvider"])
        try:
            (out,) = session.run(self.engine.outputs, feeds)
        except Exception as e:  # a garbage index or mask read from a wrong buffer
            self.cudart.violations.append(f"the engine failed on what its buffers held: {e}")
            return
        self.cudart.write(addresses[self.engine.outputs[0]], out.astype(np.float32).tobytes(), "engine output")


class DoubleRuntime:
    def __init__(self, module: DoubleTensorRT, logger) -> None:
        self.module = module

    def deserialize_cuda_engine(self, data: bytes):
        self.module.cudart.calls.append(("deserialize_cuda_engine", len(data)))
        if not data.startswith(DOUBLE_PLAN_MAGIC):
            return None
        header_len = int.from_bytes(data[len(DOUBLE_PLAN_MAGIC) : len(DOUBLE_PLAN_MAGIC) + 8], "little")
        start = len(DOUBLE_PLAN_MAGIC) + 8
        profile = json.loads(data[start : start + header_len])
        return DoubleEngine(self.module, data[start + header_len :], profile)


class DoubleBuilder:
    def __init__(self, module: DoubleTensorRT, logger) -> None:
        self.module = module

    def create_network(self, flags: int) -> DoubleNetwork:
        self.module.network_flags.append(flags)
        return DoubleNetwork(flags)

    def create_builder_config(self) -> DoubleBuilderConfig:
        return DoubleBuilderConfig()

    def create_optimization_profile(self) -> DoubleProfile:
        return DoubleProfile()

    def build_serialized_network(self, network: DoubleNetwork, config: DoubleBuilderConfig):
        self.module.built.append((network, config))
        (profile,) = config.profiles
        header = json.dumps(profile.shapes).encode()
        return DOUBLE_PLAN_MAGIC + len(header).to_bytes(8, "little") + header + network.model.SerializeToString()


class DoubleTensorRT(types.ModuleType):
    """TEST DOUBLE of the ``tensorrt`` module (the subset fpt-deploy calls), bound to a ``DoubleCudart``."""

    IS_TEST_DOUBLE = True
    DataType, TensorIOMode, LayerType, ILogger = DataType, TensorIOMode, LayerType, DoubleILogger
    float32 = DataType.FLOAT
    NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)  # 11.x's value
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    BuilderFlag = types.SimpleNamespace(TF32="TF32")

    def __init__(self, cudart: DoubleCudart, version: str = "10.15.1.29", fail: tuple[str, ...] = ()) -> None:
        super().__init__("tensorrt")
        self.__version__, self.cudart, self.fail = version, cudart, fail
        self.network_flags: list[int] = []
        self.built: list = []

    @staticmethod
    def nptype(dtype: DataType):
        return dtype.value

    def _factory(self, what: str, cls, *args):
        if what in self.fail:  # what pybind11 raises when a TensorRT factory returns nullptr
            raise TypeError("pybind11::init(): factory function returned nullptr")
        return cls(self, *args)

    def Runtime(self, logger):  # noqa: N802
        return self._factory("Runtime", DoubleRuntime, logger)

    def Builder(self, logger):  # noqa: N802
        return self._factory("Builder", DoubleBuilder, logger)

    def OnnxParser(self, network, logger):  # noqa: N802
        return DoubleOnnxParser(network, logger)


def install(monkeypatch, cudart: DoubleCudart, trt: DoubleTensorRT | None) -> None:
    """Put the doubles into ``sys.modules`` under the real names for one test (``trt`` None: not installed)."""
    import sys

    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    if trt is None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError, as when absent
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)


def plan_graph(path: Path):
    """The ONNX graph inside a plan the double's builder wrote (for assertions on what was built)."""
    import onnx

    data = path.read_bytes()
    assert data.startswith(DOUBLE_PLAN_MAGIC), f"{path} was not written by the TensorRT test double"
    header_len = int.from_bytes(data[len(DOUBLE_PLAN_MAGIC) : len(DOUBLE_PLAN_MAGIC) + 8], "little")
    return onnx.load_from_string(data[len(DOUBLE_PLAN_MAGIC) + 8 + header_len :])
