"""A deserialized engine with device buffers for its largest shapes, bound once, and one CUDA stream."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from fpt_deploy.serving.runtimes.tensorrt.config import ENGINE_DTYPES, ENGINE_INPUTS
from fpt_deploy.serving.runtimes.tensorrt.cuda import Cuda, CudaError, create_checked, trt_logger

from fpt_deploy.artifacts import BACKBONE_OUTPUT, NORM_TABLE_INPUTS, TASK_INDEX_INPUT
from fpt_deploy.errors import ArtifactError, ConfigError, FptDeployError, RuntimeUnavailableError

log = logging.getLogger(__name__)


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
        self._runtime = create_checked(trt.Runtime, "runtime", trt_logger(trt))
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
