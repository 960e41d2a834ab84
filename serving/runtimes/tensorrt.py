"""TensorRT: build an engine of the backbone, check it, and serve it. Torch-free; CUDA through cuda-python.

One module holds every TensorRT code path, and one CUDA library (cuda-python's ``cuda.bindings.runtime``)
moves every buffer: ``build_engine`` (what ``fpt-deploy build-engine`` calls) runs its parity check
through the same ``EngineSession`` that ``TensorRTRuntime`` (``--runtime tensorrt``) serves with.

The engine is the repository's backbone wrapped with a Gather by ``task_index`` from resident norm
tables (``tensorrt_graph.wrap_with_task_index``). Its I/O::

    hidden (B, L, D) f32, attention_mask (B, L) i64, task_index (B,) i64,
    norm_table_weight / norm_table_bias (T, N_norm, D) f32            ->  last_hidden (B, L, D) f32

B, L and T are dynamic within one optimisation profile; its maxima are the engine's capacity, which
``serve`` compares with its settings before it accepts a request (``EngineCapacity``). Device buffers
are allocated once for the maxima and bound once; a call copies hidden, mask and indices in and
``last_hidden`` out on one stream. The tables are copied when tasks are loaded, live ones included.

What runs without a GPU: the graph steps (``tensorrt_graph``) and the capacity arithmetic. Where
TensorRT, cuda-python or a usable GPU is missing, the first call that needs one raises
``RuntimeUnavailableError`` saying what to install or where to run.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime
from fpt_deploy.serving.runtimes.tensorrt_graph import (
    TABLE_TENSORRT_VERSION,
    UnsupportedOperatorError,
    check_tensorrt_ops,
    convert_to_mixed_precision,
    wrap_with_task_index,
)

from fpt_deploy.artifacts import (
    BACKBONE_INPUTS,
    BACKBONE_OUTPUT,
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    NORM_TABLE_INPUTS,
    TASK_INDEX_INPUT,
    BackboneArtifact,
    Repository,
    backbone_dir,
    open_repository,
    repository_lock,
    sha256_file,
    verify_file,
)
from fpt_deploy.atomic import write_bytes, write_with
from fpt_deploy.errors import (
    ArtifactError,
    ConfigError,
    ExportMismatchError,
    FptDeployError,
    RuntimeUnavailableError,
    collect,
)

log = logging.getLogger(__name__)

# The engine's tensors, in binding order, with the dtype each must have.
ENGINE_INPUTS = ("hidden", "attention_mask", TASK_INDEX_INPUT, *NORM_TABLE_INPUTS)
ENGINE_DTYPES = {
    "hidden": np.float32,
    "attention_mask": np.int64,
    TASK_INDEX_INPUT: np.int64,
    NORM_TABLE_INPUTS[0]: np.float32,
    NORM_TABLE_INPUTS[1]: np.float32,
    BACKBONE_OUTPUT: np.float32,
}
VARIANTS = {False: "trt-fp32", True: "trt-fp16"}  # manifest variant by --fp16
# Default parity tolerances (max |engine - ONNX Runtime fp32|). fp16 computes MatMul/Gemm in half
# precision; its default sits a few times above what the rewrite differs from fp32 on real MiniLM rows
# and below what random rows reach, measured by `python -m bench.gpu_check --sections fp16-parity`
# (figures in BENCHMARKS.md).
DEFAULT_ATOL = {False: 1e-3, True: 2e-2}

GPU_HELP = (
    "TensorRT engines are built and served on the machine (same GPU model, same TensorRT) that serves "
    "them: there, `pip install 'fpt-deploy[gpu]'`; elsewhere use --runtime ort"
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


# --- CUDA (cuda-python) ------------------------------------------------------------------------------


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
            f"install TensorRT >= {want} (`pip install 'fpt-deploy[gpu]'`)"
        )
    return trt, cuda


def _logger(trt):
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


def _create(factory: Callable, what: str, *args):
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


# --- capacity ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineCapacity:
    """The largest batch an engine's optimisation profile admits: rows, tokens a row, resident tasks."""

    max_rows: int
    max_len: int
    max_tasks: int

    @classmethod
    def of(cls, engine) -> EngineCapacity:
        hidden = engine.get_tensor_profile_shape("hidden", 0)[2]
        table = engine.get_tensor_profile_shape(NORM_TABLE_INPUTS[0], 0)[2]
        return cls(max_rows=int(hidden[0]), max_len=int(hidden[1]), max_tasks=int(table[0]))

    def check(self, *, rows: int, seq_lens: Mapping[str, int], tasks: int) -> None:
        """Raise ``ConfigError`` when the server's settings exceed the engine, naming the options that fit."""
        problems = []
        if rows > self.max_rows:
            problems.append(f"--max-batch-size {rows} exceeds its {self.max_rows} rows")
        too_long = {name: n for name, n in seq_lens.items() if n > self.max_len}
        if too_long:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(too_long.items()))
            problems.append(f"tasks longer than its {self.max_len} tokens: {listed}")
        if tasks > self.max_tasks:
            problems.append(f"{tasks} tasks are loaded, its norm tables hold {self.max_tasks}")
        if problems:
            fit = (
                f"--max-batch {max(rows, self.max_rows)} --max-len {max([self.max_len, *seq_lens.values()])} "
                f"--max-tasks {max(tasks, self.max_tasks)}"
            )
            raise ConfigError(
                f"the TensorRT engine is too small for this server: {'; '.join(problems)}. Rebuild it with "
                f"`fpt-deploy build-engine {fit}`, or serve with settings inside its limits"
            )


# --- running an engine ----------------------------------------------------------------------------------


class EngineSession:
    """A deserialized engine, device buffers for its largest shapes bound once, and one CUDA stream.

    ``run`` and ``close`` hold one lock: ``close`` waits for a running call and frees nothing while a
    call may still use the buffers (after ``close_timeout_s`` it refuses and keeps them, logged).
    """

    close_timeout_s = 60.0

    def __init__(self, trt, cuda: Cuda, engine_bytes: bytes, where: str) -> None:
        self._cuda, self._where = cuda, where
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)
        self._stream = None
        self._closed = False
        self._runtime = _create(trt.Runtime, "runtime", _logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ArtifactError(
                f"{where} is not a TensorRT engine for this GPU and TensorRT {trt.__version__} (see the errors "
                "logged above); rebuild it here with `fpt-deploy build-engine`"
            )
        self._check_io(trt)
        self.capacity = EngineCapacity.of(self.engine)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeUnavailableError(f"TensorRT could not create an execution context for {where} (GPU memory?)")
        try:
            self._stream = cuda.stream_create()
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _check_io(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = {n: self.engine.get_tensor_mode(n) for n in names}
        inputs = sorted(n for n in names if mode[n] == trt.TensorIOMode.INPUT)
        outputs = sorted(n for n in names if mode[n] == trt.TensorIOMode.OUTPUT)
        if inputs != sorted(ENGINE_INPUTS) or outputs != [BACKBONE_OUTPUT]:
            raise ArtifactError(
                f"{self._where} has inputs {inputs} and outputs {outputs}; an fpt-deploy engine has "
                f"{sorted(ENGINE_INPUTS)} -> {[BACKBONE_OUTPUT]}; rebuild it with `fpt-deploy build-engine`"
            )
        wrong = {
            n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name
            for n in names
            if np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) != ENGINE_DTYPES[n]
        }
        if wrong:
            raise ArtifactError(f"{self._where} has tensors of unexpected dtypes {wrong}; rebuild it")

    def _allocate(self) -> None:
        cap, d = self.capacity, self.engine.get_tensor_profile_shape("hidden", 0)[2][2]
        n_norm = self.engine.get_tensor_profile_shape(NORM_TABLE_INPUTS[0], 0)[2][1]
        elements = {
            "hidden": cap.max_rows * cap.max_len * d,
            "attention_mask": cap.max_rows * cap.max_len,
            TASK_INDEX_INPUT: cap.max_rows,
            NORM_TABLE_INPUTS[0]: cap.max_tasks * n_norm * d,
            NORM_TABLE_INPUTS[1]: cap.max_tasks * n_norm * d,
            BACKBONE_OUTPUT: cap.max_rows * cap.max_len * d,
        }
        for name, count in elements.items():
            nbytes = count * np.dtype(ENGINE_DTYPES[name]).itemsize
            self._buffers[name] = (self._cuda.malloc(nbytes), nbytes)
            if not self.context.set_tensor_address(name, self._buffers[name][0]):
                raise ArtifactError(f"TensorRT refused the device address of {name!r} in {self._where}")

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise ConfigError(
                f"{self._where} does not accept {name} of shape {list(shape)} (its profile admits up to "
                f"{self.capacity.max_rows} rows, {self.capacity.max_len} tokens, {self.capacity.max_tasks} tasks)"
            )

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeUnavailableError(f"the TensorRT engine {self._where} is closed")

    def set_tables(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Copy the norm tables (T, N_norm, D) to the device (after any running call finishes)."""
        if weight.shape[0] > self.capacity.max_tasks:
            raise ConfigError(
                f"{weight.shape[0]} tasks do not fit the norm tables of {self._where}, which hold "
                f"{self.capacity.max_tasks}; rebuild it with `fpt-deploy build-engine --max-tasks {weight.shape[0]}`"
            )
        with self._lock:
            self._ensure_open()
            for name, table in zip(NORM_TABLE_INPUTS, (weight, bias), strict=True):
                table = np.ascontiguousarray(table, dtype=np.float32)
                self._set_shape(name, table.shape)
                self._cuda.to_device(self._buffers[name][0], table, self._stream)
            self._cuda.synchronize(self._stream)  # the host tables may be freed once this returns

    def run(self, hidden: np.ndarray, attention_mask: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """last_hidden (B, L, D) of one batch; hidden (B, L, D), attention_mask (B, L), task_index (B,)."""
        B, L, D = hidden.shape
        if B > self.capacity.max_rows or L > self.capacity.max_len:
            raise ConfigError(
                f"the TensorRT engine takes at most {self.capacity.max_rows} rows of {self.capacity.max_len} "
                f"tokens (got {B} x {L}); rebuild it with `fpt-deploy build-engine --max-batch --max-len`"
            )
        inputs = {
            "hidden": np.ascontiguousarray(hidden, dtype=np.float32),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            TASK_INDEX_INPUT: np.ascontiguousarray(task_index, dtype=np.int64),
        }
        out = np.empty((B, L, D), dtype=np.float32)
        with self._lock:
            self._ensure_open()
            try:
                for name, array in inputs.items():
                    self._set_shape(name, array.shape)
                    self._cuda.to_device(self._buffers[name][0], array, self._stream)
                shape = tuple(self.context.get_tensor_shape(BACKBONE_OUTPUT))
                if shape != out.shape:
                    raise ArtifactError(f"{self._where} would write {BACKBONE_OUTPUT} {shape}, not {out.shape}")
                if not self.context.execute_async_v3(self._stream_handle()):
                    raise CudaError(f"TensorRT failed to run {self._where} (see the TensorRT errors logged above)")
                self._cuda.to_host(out, self._buffers[BACKBONE_OUTPUT][0], self._stream)
            finally:
                # Whatever was queued finishes before the lock is released: the host arrays and the device
                # buffers it uses stay valid until then, even when this call failed half-way.
                self._cuda.synchronize(self._stream)
        return out

    def _stream_handle(self) -> int:
        return int(self._stream)

    def close(self) -> None:
        """Free every device buffer once and destroy the stream; waits for a running call first."""
        if not self._lock.acquire(timeout=self.close_timeout_s):
            log.error(
                "a call on the TensorRT engine %s is still running after %.0fs; its device memory is kept, not "
                "freed under it",
                self._where,
                self.close_timeout_s,
            )
            return
        try:
            if self._closed:
                return
            self._closed = True
            errors = []
            for name, (ptr, _) in self._buffers.items():
                try:
                    self._cuda.free(ptr)
                except FptDeployError as e:
                    errors.append(f"{name}: {e}")
            self._buffers.clear()
            if self._stream is not None:
                try:
                    self._cuda.stream_destroy(self._stream)
                except FptDeployError as e:
                    errors.append(f"stream: {e}")
                self._stream = None
            self.context = self.engine = self._runtime = None  # TensorRT objects release their memory on delete
            if errors:
                raise CudaError(f"releasing the TensorRT engine {self._where} failed: {'; '.join(errors)}")
        finally:
            self._lock.release()


def _rows_in_use(weight: np.ndarray, bias: np.ndarray) -> int:
    """Table rows up to the last one holding any value; rows after it are spare (all zero)."""
    used = np.flatnonzero(np.any(weight != 0, axis=(1, 2)) | np.any(bias != 0, axis=(1, 2)))
    return int(used[-1]) + 1 if used.size else 0


class TensorRTRuntime(Runtime):
    """``--runtime tensorrt``: the engine ``fpt-deploy build-engine`` recorded, norm tables resident on the GPU."""

    def __init__(
        self, engine_file: Path, norm_weight: np.ndarray, norm_bias: np.ndarray, *, threads: int | None = None
    ) -> None:
        super().__init__(norm_weight, norm_bias)
        engine_file = Path(engine_file)
        trt, cuda = load_gpu_stack()
        if not engine_file.is_file():
            raise ArtifactError(f"TensorRT engine {engine_file} is missing; run `fpt-deploy build-engine` first")
        self.session = EngineSession(trt, cuda, engine_file.read_bytes(), str(engine_file))
        try:
            self._upload_tables(self.norm_weight, self.norm_bias)
        except BaseException:
            self.session.close()
            raise
        cap = self.session.capacity
        log.info(
            "TensorRT engine %s: up to %d rows of %d tokens, %d of %d task rows used",
            engine_file,
            cap.max_rows,
            cap.max_len,
            self.num_tasks,
            cap.max_tasks,
        )

    @classmethod
    def backbone_file(cls, backbone: BackboneArtifact, root: Path, variant: str) -> Path:
        """The engine ``build-engine`` recorded for ``variant`` (fp32 -> trt-fp32, fp16 -> trt-fp16)."""
        name = variant if variant.startswith("trt-") else f"trt-{variant}"
        if name not in backbone.files:
            raise ArtifactError(
                f"backbone {backbone.fingerprint[:16]} has no TensorRT engine {name!r}; run `fpt-deploy "
                f"build-engine{' --fp16' if name == VARIANTS[True] else ''}` on this GPU first, or pass --engine"
            )
        return backbone.path(root, name)

    @property
    def capacity(self) -> EngineCapacity:
        return self.session.capacity

    def check_capacity(self, *, max_batch_size: int, seq_lens: Mapping[str, int]) -> None:
        """Refuse settings the engine cannot run: rows per batch, each task's tokens, and loaded tasks."""
        tasks = _rows_in_use(self.norm_weight, self.norm_bias)
        self.capacity.check(rows=max_batch_size, seq_lens=seq_lens, tasks=tasks)

    def set_norm_tables(self, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        """Replace the tables (tasks loaded live) up to the engine's ``max_tasks``, without a rebuild.

        The caller's tables may hold spare rows past its last task (all zero, as a growing table
        leaves them); only rows in use must fit the engine.
        """
        weight, bias = np.asarray(norm_weight), np.asarray(norm_bias)
        self._check_rows(weight, bias)  # before anything changes: a refused update leaves the old tables
        super().set_norm_tables(weight, bias)
        self._upload_tables(self.norm_weight, self.norm_bias)

    def _check_rows(self, weight: np.ndarray, bias: np.ndarray) -> None:
        used = _rows_in_use(weight, bias)
        if used > self.capacity.max_tasks:
            self.capacity.check(rows=0, seq_lens={}, tasks=used)

    def _upload_tables(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self._check_rows(weight, bias)
        rows = max(1, min(len(weight), self.capacity.max_tasks))
        self.session.set_tables(weight[:rows], bias[:rows])

    def run_backbone(self, hidden, attention_mask, task_index):
        return self.session.run(hidden, attention_mask, task_index)

    def close(self) -> None:
        self.session.close()


# --- building an engine ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EngineConfig:
    """``fpt-deploy build-engine``: a TensorRT engine of a repository's backbone; validated at once."""

    repo: Path = field(default=Path("deploy"), metadata={"help": "Deployment repository holding the backbone."})
    fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Backbone fingerprint (prefix) when the repository holds several.",
            "aliases": ("--backbone",),
        },
    )
    fp16: bool = field(
        default=False,
        metadata={"help": "MatMul/Gemm in fp16; normalisation, softmax and residuals stay fp32."},
    )
    max_batch: int = field(default=64, metadata={"help": "Largest batch (rows of one call) the engine accepts."})
    max_len: int = field(default=512, metadata={"help": "Longest sequence (tokens a row) the engine accepts."})
    max_tasks: int = field(
        default=16, metadata={"help": "Most tasks in the resident norm tables (adding one needs no rebuild)."}
    )
    opt_batch: int | None = field(
        default=None, metadata={"help": "Batch TensorRT tunes its kernels for (default: max-batch / 2)."}
    )
    opt_len: int | None = field(
        default=None, metadata={"help": "Sequence length TensorRT tunes its kernels for (default: max-len / 4)."}
    )
    workspace_gib: float = field(default=4.0, metadata={"help": "Builder scratch memory limit, GiB."})
    atol: float | None = field(
        default=None,
        metadata={"help": "Largest allowed |TensorRT - ONNX Runtime| in the parity check (default by precision)."},
    )

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        problems = [
            f"{name} must be >= 1 (got {value})"
            for name, value in (("max-batch", self.max_batch), ("max-len", self.max_len), ("max-tasks", self.max_tasks))
            if value < 1
        ]
        if self.opt_batch is None:
            self.opt_batch = max(1, self.max_batch // 2)
        if self.opt_len is None:
            self.opt_len = max(1, self.max_len // 4)
        if not 1 <= self.opt_batch <= max(self.max_batch, 1):
            problems.append(f"opt-batch must be in 1..max-batch={self.max_batch} (got {self.opt_batch})")
        if not 1 <= self.opt_len <= max(self.max_len, 1):
            problems.append(f"opt-len must be in 1..max-len={self.max_len} (got {self.opt_len})")
        if not self.workspace_gib > 0:
            problems.append(f"workspace-gib must be > 0 (got {self.workspace_gib})")
        if self.atol is None:
            self.atol = DEFAULT_ATOL[self.fp16]
        if not self.atol > 0:
            problems.append(f"atol must be > 0 (got {self.atol})")
        collect(problems, ConfigError)

    @property
    def variant(self) -> str:
        """The backbone variant the engine is recorded under."""
        return VARIANTS[self.fp16]

    def profile(self, num_norms: int, hidden: int) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every engine input: B, L and T are dynamic."""
        b_opt, b_max, l_opt, l_max, t = self.opt_batch, self.max_batch, self.opt_len, self.max_len, self.max_tasks
        table = ((1, num_norms, hidden), (t, num_norms, hidden), (t, num_norms, hidden))
        return {
            "hidden": ((1, 1, hidden), (b_opt, l_opt, hidden), (b_max, l_max, hidden)),
            "attention_mask": ((1, 1), (b_opt, l_opt), (b_max, l_max)),
            TASK_INDEX_INPUT: ((1,), (b_opt,), (b_max,)),
            NORM_TABLE_INPUTS[0]: table,
            NORM_TABLE_INPUTS[1]: table,
        }


@dataclass(kw_only=True)
class EngineResult:
    path: Path  # the .plan file
    variant: str  # manifest variant ("trt-fp32" | "trt-fp16")
    fingerprint: str
    tasks: list[str]  # the task order of the norm tables used for the parity check
    parity: dict[str, float]  # max |engine - ONNX Runtime| at the profile's min, opt and max shape
    seconds: float  # build time
    info: dict = field(default_factory=dict)  # what the manifest records

    @property
    def max_abs_diff(self) -> float:
        return max(self.parity.values())


def build_serialized(trt, onnx_path: Path, config: EngineConfig, shapes: dict) -> bytes:
    """The serialized engine of the graph at ``onnx_path``, strongly typed, with one profile of ``shapes``."""
    logger = _logger(trt)
    builder = _create(trt.Builder, "builder", logger)
    # Explicit batch is the only mode since TensorRT 10; strong typing makes the graph's own types
    # (fp32 normalisation, fp16 MatMul under --fp16) binding. In 11.x the flag is accepted and implied.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = _create(trt.OnnxParser, "ONNX parser", network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedOperatorError(f"TensorRT's ONNX parser rejected the backbone: {errors}")
    _check_normalisation_fp32(trt, network)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):  # fp32 means fp32: no TF32 tensor-core rounding in the parity check
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(shapes):
        raise ArtifactError(f"the wrapped backbone has inputs {sorted(inputs)}, expected {sorted(shapes)}")
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeUnavailableError(
            "TensorRT could not build the engine (see the TensorRT errors logged above); "
            "try a smaller --max-batch/--max-len or a larger --workspace-gib"
        )
    return bytes(serialized)


def _check_normalisation_fp32(trt, network) -> None:
    """Every normalisation layer of the parsed network must compute in fp32 (docs/architecture.md, "Runtimes")."""
    wrong = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            dtypes = {layer.get_input(k).dtype for k in range(layer.num_inputs) if layer.get_input(k) is not None}
            dtypes.add(layer.get_output(0).dtype)
            if dtypes != {trt.float32}:
                wrong.append(f"{layer.name} ({', '.join(sorted(str(d) for d in dtypes))})")
    if wrong:
        raise ExportMismatchError(f"normalisation layers not in fp32: {', '.join(wrong)}")


def _norm_tables(repo: Repository, backbone: BackboneArtifact, max_tasks: int):
    """The tasks on ``backbone`` in name order, and their norm tables (T, N_norm, D)."""
    tasks = sorted(name for name, t in repo.tasks.items() if t.fingerprint == backbone.fingerprint)
    if not tasks:
        raise ArtifactError(
            f"{repo.root} has no task on backbone {backbone.fingerprint[:16]}; export one first "
            "(its norm parameters and input head are needed to check the engine)"
        )
    if len(tasks) > max_tasks:
        raise ConfigError(
            f"{repo.root} has {len(tasks)} tasks on this backbone, more than --max-tasks {max_tasks}; "
            f"pass --max-tasks {len(tasks)} or more"
        )
    weights, biases = zip(*(repo.tasks[name].load_norms(repo.root) for name in tasks), strict=True)
    return tasks, np.stack(weights), np.stack(biases)


def _raw_example(task, rng, rows: int) -> np.ndarray:
    """``rows`` raw inputs a client could send ``task`` (its declared dtype and shape; token ids, no padding)."""
    shape, dtype = (rows, *(int(s) for s in task.input["shape"][1:])), np.dtype(task.input["dtype"])
    vocab = int(getattr(task.spec, "vocab_size", 0) or 0)
    if vocab:
        return rng.integers(1, vocab, shape).astype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, 0), min(info.max, 255) + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def parity_feeds(repo: Repository, tasks: list[str], tables, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """Engine inputs of ``shape`` (B, L, T): hidden rows from the tasks' own input heads, mixed tasks, padding.

    The hidden states are what the backbone sees in service (each task's input head on raw inputs of
    its declared type), tiled or cut to L tokens; row r belongs to task r mod len(tasks), and every
    other row is padded after a prefix. The T table rows cycle through the real tasks' norms.
    """
    import onnxruntime as ort

    B, L, T = shape
    rng = np.random.default_rng(seed)
    weight, bias = tables
    heads, rows = {}, []
    for r in range(B):
        art = repo.tasks[tasks[r % len(tasks)]]
        if art.name not in heads:
            path = verify_file(repo.root, art.files["input"], art.sha256["input"])
            heads[art.name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        raw = {INPUT_HEAD_INPUT: _raw_example(art, rng, 1)}
        hidden = heads[art.name].run([INPUT_HEAD_OUTPUTS[0]], raw)[0][0]  # (L_task, D)
        rows.append(np.resize(hidden, (L, hidden.shape[1])))  # tiled or cut along the sequence
    mask = np.ones((B, L), np.int64)
    for r in range(1, B, 2):
        mask[r, max(1, L - r) :] = 0  # real tokens are a prefix
    order = [k % len(tasks) for k in range(T)]
    return {
        "hidden": np.stack(rows).astype(np.float32),
        "attention_mask": mask,
        TASK_INDEX_INPUT: (np.arange(B) % min(T, len(tasks))).astype(np.int64),
        NORM_TABLE_INPUTS[0]: weight[order].astype(np.float32),
        NORM_TABLE_INPUTS[1]: bias[order].astype(np.float32),
    }


def check_parity(session: EngineSession, reference, repo, tasks, tables, shapes: dict) -> dict[str, float]:
    """Max |engine - ONNX Runtime| at the min, opt and max shape of the profile (B, L, T of each)."""
    diffs = {}
    for k, point in enumerate(("min", "opt", "max")):
        B, L, _ = shapes["hidden"][k]
        T = shapes[NORM_TABLE_INPUTS[0]][k][0]
        feeds = parity_feeds(repo, tasks, tables, (B, L, T), seed=k)
        expected = reference.run([BACKBONE_OUTPUT], feeds)[0]
        session.set_tables(feeds[NORM_TABLE_INPUTS[0]], feeds[NORM_TABLE_INPUTS[1]])
        got = session.run(feeds["hidden"], feeds["attention_mask"], feeds[TASK_INDEX_INPUT])
        diffs[f"{point} B={B} L={L} T={T}"] = float(np.max(np.abs(got - expected)))
    return diffs


def build_engine(config: EngineConfig) -> EngineResult:
    """Build, check and record a TensorRT engine of the repository's backbone wrapped with the task-index Gather.

    Steps: choose the backbone, check the GPU stack, check the ONNX operators against TensorRT's parser,
    wrap, (fp16: rewrite to mixed precision), build with one profile over B, L and T, compare the engine
    with ONNX Runtime (CPU, the wrapped fp32 graph) at the profile's min, opt and max shapes on hidden
    rows from the tasks' input heads, then write ``backbone.<variant>.plan`` and the wrapped ONNX
    atomically and record both in the manifest with the capacity and the task order of the tables.
    """
    import onnx
    import onnxruntime as ort

    repo = open_repository(config.repo)
    backbone = repo.find_backbone(config.fingerprint)
    tasks, table_w, table_b = _norm_tables(repo, backbone, config.max_tasks)
    trt, cuda = load_gpu_stack()
    gpu, capability = cuda.device_name()

    plain = onnx.load(str(backbone.path(repo.root)))
    if [i.name for i in plain.graph.input] != list(BACKBONE_INPUTS):
        raise ArtifactError(
            f"backbone {backbone.fingerprint[:16]} has inputs {[i.name for i in plain.graph.input]}, "
            f"not {list(BACKBONE_INPUTS)}; re-run `fpt-deploy export`"
        )
    check_tensorrt_ops(plain, "backbone")
    wrapped = wrap_with_task_index(plain)
    to_build = convert_to_mixed_precision(wrapped) if config.fp16 else wrapped
    check_tensorrt_ops(to_build, "wrapped backbone")
    shapes = config.profile(backbone.num_norms, backbone.hidden_size)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fpt-trt-") as tmp:
        onnx_path = Path(tmp) / "backbone.onnx"
        onnx.save(to_build, str(onnx_path), save_as_external_data=to_build.ByteSize() > (1 << 30))
        log.info(
            "building a TensorRT %s %s engine on %s (B<=%d, L<=%d, T<=%d; tuned for B=%d, L=%d) ...",
            trt.__version__,
            config.variant,
            gpu,
            config.max_batch,
            config.max_len,
            config.max_tasks,
            config.opt_batch,
            config.opt_len,
        )
        engine_bytes = build_serialized(trt, onnx_path, config, shapes)
    seconds = time.perf_counter() - start

    reference = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
    session = EngineSession(trt, cuda, engine_bytes, f"the new {config.variant} engine")
    try:
        parity = check_parity(session, reference, repo, tasks, (table_w, table_b), shapes)
    finally:
        session.close()
    for point, diff in parity.items():
        log.info("TensorRT vs ONNX Runtime at %s: max abs diff %.3g (atol %.1g)", point, diff, config.atol)
    failed = {point: diff for point, diff in parity.items() if not diff <= config.atol}
    if failed:
        listed = ", ".join(f"{point}: {diff:.3g}" for point, diff in failed.items())
        raise ExportMismatchError(
            f"the TensorRT engine differs from ONNX Runtime beyond --atol {config.atol} ({listed}); not recording it"
        )

    folder = backbone_dir(backbone.fingerprint)
    plan_rel, wrapped_rel = f"{folder}/backbone.{config.variant}.plan", f"{folder}/backbone.task-index.onnx"
    write_bytes(repo.root / plan_rel, engine_bytes)
    write_with(repo.root / wrapped_rel, lambda tmp: onnx.save(wrapped, str(tmp)))
    info = {
        "file": plan_rel,
        "onnx": wrapped_rel,
        "tasks": tasks,  # row t of the norm tables is tasks[t]; new tasks append (up to max_tasks)
        "precision": "fp16 MatMul/Gemm, fp32 elsewhere" if config.fp16 else "fp32",
        "profile": {
            name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in shapes.items()
        },
        "max_batch": config.max_batch,
        "max_len": config.max_len,
        "max_tasks": config.max_tasks,
        "workspace_gib": config.workspace_gib,
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "compute_capability": list(capability),
        "parity_vs_onnxruntime": parity,
        "atol": config.atol,
    }
    with repository_lock(repo.root):  # re-read under the lock, so a concurrent export's additions are kept
        repo = open_repository(config.repo)
        entry = repo.backbones[backbone.fingerprint]
        for variant, rel in ((config.variant, plan_rel), ("task-index", wrapped_rel)):
            entry.files[variant], entry.sha256[variant] = rel, sha256_file(repo.root / rel)
        entry.extra.setdefault("engines", {})[config.variant] = info
        repo.save_manifest()
    log.info("wrote %s (%.1f MB) in %.0fs", plan_rel, len(engine_bytes) / 1e6, seconds)
    return EngineResult(
        path=repo.root / plan_rel,
        variant=config.variant,
        fingerprint=backbone.fingerprint,
        tasks=tasks,
        parity=parity,
        seconds=seconds,
        info=info,
    )
