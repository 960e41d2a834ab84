"""Runtimes that execute the shared backbone: ONNX Runtime (CPU, CUDA) and TensorRT. Torch-free.

Every runtime holds the norm tables of all loaded tasks, (T, N_norm, D) each, loaded once, and runs a
batch that mixes tasks given one ``task_index`` per row (DESIGN.md, "Backbone ONNX contract"):

- ONNX Runtime gathers each row's norm parameters with one vectorised ``np.take`` per batch and feeds
  the plain backbone graph (``hidden``, ``attention_mask``, ``norm_weight``, ``norm_bias``), which it
  loads rewritten with its own fused transformer operators (``fpt_deploy.ort_fusion``);
- TensorRT keeps the tables resident on the GPU and only the indices travel: the engine that
  ``fpt-deploy build-engine`` writes wraps the backbone with a Gather by ``task_index``.

Task heads are small, so they always run on ONNX Runtime CPU sessions with one thread each
(``create_head_session``); the cores go to the backbone.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from fpt_deploy.artifacts import BACKBONE_INPUTS, BACKBONE_OUTPUT, NORM_TABLE_INPUTS, TASK_INDEX_INPUT
from fpt_deploy.errors import ArtifactError, ConfigError, RuntimeUnavailableError
from fpt_deploy.ort_fusion import ort_graph

log = logging.getLogger(__name__)


class Runtime(ABC):
    """Executes the backbone on a batch of rows that may belong to different tasks."""

    name: str = ""

    def __init__(self, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        if norm_weight.shape != norm_bias.shape or norm_weight.ndim != 3:
            raise ArtifactError(f"norm tables must both be (T, N_norm, D); got {norm_weight.shape}, {norm_bias.shape}")
        self.norm_weight = np.ascontiguousarray(norm_weight, dtype=np.float32)  # (T, N_norm, D)
        self.norm_bias = np.ascontiguousarray(norm_bias, dtype=np.float32)  # (T, N_norm, D)

    @abstractmethod
    def run_backbone(self, hidden: np.ndarray, attention_mask: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """hidden (B, L, D) float32, attention_mask (B, L) int64, task_index (B,) int64 -> last_hidden (B, L, D)."""

    def close(self) -> None:  # noqa: B027  (optional hook: most runtimes hold nothing to release)
        """Release device resources (a no-op where there are none)."""


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def session_options(threads: int):
    """The server's ONNX Runtime settings: ``threads`` intra-op threads, no spinning, every graph rewrite."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning worker threads would steal the cores the HTTP event loop and the heads need between calls.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


_SHARED_HEAD_ALLOCATOR = False


def _share_head_allocator() -> None:
    """Register one CPU arena for every head session of the process (ONNX Runtime's env allocator).

    Each session would otherwise keep its own buffers: with 50 tasks, 100 sessions. Shared, an added
    task costs about its weights (tenths of a MB), not a copy of the activation buffers.
    """
    global _SHARED_HEAD_ALLOCATOR
    if _SHARED_HEAD_ALLOCATOR:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    _SHARED_HEAD_ALLOCATOR = True


def create_head_session(path: Path):
    """A one-thread CPU session for a task head: heads are tiny, and many tasks share the process."""
    import onnxruntime as ort

    _share_head_allocator()
    so = session_options(1)
    # Basic rewrites only: the extended ones found nothing to speed up in a head (an MNIST input + output
    # head on 16 rows: 319 vs 321 us) and cost memory (2 head sessions: 384 vs 451 KB a task).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_mem_pattern = False  # no per-session pre-planned buffers: the shared arena serves them
    so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime ({e}); re-run `fpt-deploy export`") from e


class OrtRuntime(Runtime):
    """The backbone ONNX on ONNX Runtime: CPU (default) or the CUDA execution provider."""

    def __init__(
        self,
        model_path: Path,
        norm_weight: np.ndarray,
        norm_bias: np.ndarray,
        *,
        cuda: bool = False,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(norm_weight, norm_bias)
        self.name = "ort-cuda" if cuda else "ort"
        threads = threads or physical_cores()
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailableError(
                    "--runtime ort-cuda needs ONNX Runtime's CUDAExecutionProvider, which this install lacks "
                    f"(has {', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu in place of "
                    "onnxruntime, or use --runtime ort"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            with ort_graph(model_path) as graph:  # the portable file, rewritten with ORT's fused operators
                self.session = ort.InferenceSession(graph, session_options(threads), providers=providers)
        except Exception as e:  # CUDA init failures and unreadable graphs both land here
            raise ArtifactError(f"{model_path} cannot be loaded by ONNX Runtime ({e})") from e
        if cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeUnavailableError(
                "ONNX Runtime could not start its CUDA provider (no usable GPU?); use --runtime ort"
            )
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(BACKBONE_INPUTS):
            raise ArtifactError(f"{model_path} has inputs {names}; a backbone needs {list(BACKBONE_INPUTS)}")
        self.threads = threads
        log.info("backbone %s on %s with %d intra-op threads", model_path.name, self.name, threads)

    def run_backbone(self, hidden, attention_mask, task_index):
        feeds = {
            "hidden": hidden,
            "attention_mask": attention_mask,
            "norm_weight": np.take(self.norm_weight, task_index, axis=0),  # (B, N_norm, D), one gather
            "norm_bias": np.take(self.norm_bias, task_index, axis=0),
        }
        return self.session.run([BACKBONE_OUTPUT], feeds)[0]


class TensorRTRuntime(Runtime):
    """A TensorRT engine of the backbone wrapped with the task-index Gather; norm tables live on the GPU.

    Engine I/O (``fpt-deploy build-engine``, export/tensorrt.py): ``hidden`` (B, L, D) f32,
    ``attention_mask`` (B, L) i64, ``task_index`` (B,) i64, and the tables ``norm_table_weight`` /
    ``norm_table_bias`` (T, N_norm, D) f32 -> ``last_hidden`` (B, L, D) f32. The tables are copied to
    the device once and stay bound; per call only hidden, mask and indices travel.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        super().__init__(norm_weight, norm_bias)
        try:
            import tensorrt as trt
        except ImportError as e:
            raise RuntimeUnavailableError(
                "--runtime tensorrt needs the tensorrt package (pip install 'fpt-deploy[gpu]') and a CUDA GPU; "
                "use --runtime ort"
            ) from e
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as e:
            raise RuntimeUnavailableError("--runtime tensorrt needs cuda-python (pip install cuda-python)") from e
        self._trt, self._cudart = trt, cudart
        count = self._check(cudart.cudaGetDeviceCount())
        if count < 1:
            raise RuntimeUnavailableError("--runtime tensorrt needs a CUDA GPU; none is visible here")
        if not Path(engine_path).is_file():
            raise ArtifactError(f"TensorRT engine {engine_path} is missing; run `fpt-deploy build-engine` first")
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"{engine_path} is not a TensorRT engine for this GPU and TensorRT version; "
                "rebuild it with `fpt-deploy build-engine`"
            )
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        needed = {"hidden", "attention_mask", TASK_INDEX_INPUT, *NORM_TABLE_INPUTS, BACKBONE_OUTPUT}
        if io != needed:
            raise ArtifactError(f"{engine_path} has tensors {sorted(io)}; expected {sorted(needed)}")
        self.context = self.engine.create_execution_context()
        self.stream = self._check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        max_b, max_l, max_t = self._profile_max()
        if self.norm_weight.shape[0] > max_t:
            raise ConfigError(
                f"{engine_path} holds norm tables of at most {max_t} tasks, {self.norm_weight.shape[0]} "
                "are loaded; serve fewer tasks or rebuild with `fpt-deploy build-engine --max-tasks`"
            )
        for name, table in zip(NORM_TABLE_INPUTS, (self.norm_weight, self.norm_bias), strict=True):
            self._upload(name, table)
            self.context.set_input_shape(name, table.shape)
        d = self.norm_weight.shape[2]
        self._max_rows, self._max_len = max_b, max_l
        self._reserve("hidden", max_b * max_l * d * 4)
        self._reserve("attention_mask", max_b * max_l * 8)
        self._reserve(TASK_INDEX_INPUT, max_b * 8)
        self._reserve(BACKBONE_OUTPUT, max_b * max_l * d * 4)
        for name, (ptr, _) in self._buffers.items():
            self.context.set_tensor_address(name, ptr)
        log.info(
            "TensorRT engine %s: up to %d rows of %d tokens, %d tasks resident",
            engine_path,
            max_b,
            max_l,
            self.norm_weight.shape[0],
        )

    def _check(self, result):
        err, *rest = result
        if int(err) != 0:
            raise RuntimeUnavailableError(f"CUDA call failed: {self._cudart.cudaGetErrorString(err)[1]}")
        return rest[0] if len(rest) == 1 else rest

    def _profile_max(self) -> tuple[int, int, int]:
        """The largest (rows, tokens, tasks) the engine's optimisation profile admits."""
        hidden = self.engine.get_tensor_profile_shape("hidden", 0)[2]
        table = self.engine.get_tensor_profile_shape(NORM_TABLE_INPUTS[0], 0)[2]
        return int(hidden[0]), int(hidden[1]), int(table[0])

    def _reserve(self, name: str, nbytes: int) -> int:
        ptr = self._check(self._cudart.cudaMalloc(nbytes))
        self._buffers[name] = (ptr, nbytes)
        return ptr

    def _upload(self, name: str, array: np.ndarray) -> None:
        ptr = self._reserve(name, array.nbytes)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind))

    def run_backbone(self, hidden, attention_mask, task_index):
        B, L, D = hidden.shape
        if B > self._max_rows or L > self._max_len:
            raise RuntimeUnavailableError(
                f"the TensorRT engine takes at most {self._max_rows} rows of "
                f"{self._max_len} tokens (got {B} x {L}); rebuild it with larger profiles"
            )
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        inputs = {
            "hidden": np.ascontiguousarray(hidden, dtype=np.float32),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            TASK_INDEX_INPUT: np.ascontiguousarray(task_index, dtype=np.int64),
        }
        for name, array in inputs.items():
            self.context.set_input_shape(name, array.shape)
            self._check(
                cudart.cudaMemcpyAsync(self._buffers[name][0], array.ctypes.data, array.nbytes, h2d, self.stream)
            )
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeUnavailableError("TensorRT failed to execute the backbone engine")
        out = np.empty((B, L, D), dtype=np.float32)
        self._check(
            cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[BACKBONE_OUTPUT][0], out.nbytes, d2h, self.stream)
        )
        self._check(cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()


def create_runtime(
    kind: str,
    backbone_path: Path | None,
    engine_path: Path | None,
    norm_weight: np.ndarray,
    norm_bias: np.ndarray,
    threads: int | None = None,
) -> Runtime:
    """The runtime named ``kind`` (ort | ort-cuda | tensorrt) over the given norm tables."""
    if kind == "tensorrt":
        return TensorRTRuntime(engine_path, norm_weight, norm_bias)
    return OrtRuntime(backbone_path, norm_weight, norm_bias, cuda=kind == "ort-cuda", threads=threads)
