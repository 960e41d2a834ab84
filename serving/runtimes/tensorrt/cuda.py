"""The CUDA runtime calls an engine needs (cuda-python), TensorRT's import and version check, its logger."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import numpy as np
from fpt_deploy.serving.runtimes.tensorrt.graph import TABLE_TENSORRT_VERSION

from fpt_deploy.errors import RuntimeUnavailableError

log = logging.getLogger(__name__)

GPU_HELP = (
    "TensorRT engines are built and served on the machine (same GPU model, same TensorRT) that serves "
    "them: there, `pip install 'fpt-deploy[gpu,tensorrt]'`; elsewhere use --runtime ort"
)
# CUDA errors that mean "no usable GPU or driver here", not a bug: they get the GPU message.
_NO_GPU_ERRORS = frozenset(
    {
        "cudaErrorNoDevice",
        "cudaErrorInsufficientDriver",
        "cudaErrorCallRequiresNewerDriver",
        "cudaErrorSystemDriverMismatch",
        "cudaErrorCompatNotSupportedOnDevice",
        "cudaErrorDevicesUnavailable",
        "cudaErrorSystemNotReady",
        "cudaErrorInitializationError",
    }
)


class CudaError(RuntimeUnavailableError):
    """A CUDA runtime call failed on a machine that has a GPU (out of memory, a launch failure, ...)."""


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)


class Cuda:
    """The few CUDA runtime calls an engine needs, each checked; cuda-python returns ``(error, *values)``."""

    def __init__(self, cudart) -> None:
        self.rt = cudart

    def check(self, result, what: str):
        """The values of a cuda-python call's ``result``, or a typed error naming ``what`` failed."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = _text(self.rt.cudaGetErrorName(err)[1])
            text = _text(self.rt.cudaGetErrorString(err)[1])
            if name in _NO_GPU_ERRORS:
                raise RuntimeUnavailableError(f"TensorRT needs a CUDA GPU: {what} says {text} ({name}). {GPU_HELP}")
            raise CudaError(f"CUDA {what} failed: {text} ({name})")
        return values[0] if len(values) == 1 else tuple(values)

    def device_name(self) -> tuple[str, tuple[int, int]]:
        """(GPU name, compute capability) of the current device; raises the GPU message without one."""
        count = self.check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count < 1:
            raise RuntimeUnavailableError(f"TensorRT needs a CUDA GPU and none is visible here. {GPU_HELP}")
        device = self.check(self.rt.cudaGetDevice(), "cudaGetDevice")
        props = self.check(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        return _text(props.name).rstrip("\x00"), (int(props.major), int(props.minor))

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def stream_create(self):
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_destroy(self, stream) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream), "cudaMemcpyAsync D2H")


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeUnavailableError(f"{what} is not installed ({e}). {GPU_HELP}") from e


def load_gpu_stack():
    """``(tensorrt, Cuda)`` after checking, in this order, cuda-python, a usable GPU, and TensorRT's version."""
    cuda = Cuda(_import("cuda.bindings.runtime", "cuda-python (`cuda.bindings.runtime`)"))
    cuda.device_name()  # the GPU message, before anything else is attempted
    trt = _import("tensorrt", "TensorRT (the `tensorrt` package)")
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < TABLE_TENSORRT_VERSION:
        want = ".".join(map(str, TABLE_TENSORRT_VERSION))
        raise RuntimeUnavailableError(
            f"TensorRT {trt.__version__} is older than {want}, whose ONNX parser the operator check follows; "
            f"install TensorRT >= {want} (`pip install 'fpt-deploy[gpu,tensorrt]'`)"
        )
    return trt, cuda


def trt_logger(trt):
    """A TensorRT ILogger that forwards to ``logging`` (library code never prints)."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return Logger()


def create_checked(factory: Callable, what: str, *args):
    """``factory(*args)``; TensorRT's pybind factories raise a bare TypeError ("returned nullptr") on failure."""
    try:
        made = factory(*args)
    except TypeError as e:
        made = None
        log.debug("%s: %s", what, e)
    if made is None:
        raise RuntimeUnavailableError(
            f"TensorRT could not create its {what} (see the TensorRT errors logged above): usually the CUDA "
            f"driver is older than this TensorRT needs, the GPU is out of memory, or TensorRT does not support "
            f"this GPU. {GPU_HELP}"
        )
    return made
