"""ONNX Runtime session settings shared by the backbone runtimes and the task heads. Torch-free.

Task heads are small, so they always run on ONNX Runtime CPU sessions with one thread each
(``create_head_session``), whatever runtime executes the backbone: the cores go to the backbone.
"""

from __future__ import annotations

from pathlib import Path

from fpt_deploy.errors import ArtifactError, RuntimeUnavailableError

ONNXRUNTIME_HELP = (
    "ONNX Runtime is not installed: pip install 'fpt-deploy[cpu]' (onnxruntime), or 'fpt-deploy[gpu]' "
    "(onnxruntime-gpu) on a CUDA machine; install one of the two, never both"
)


def import_onnxruntime():
    """The ``onnxruntime`` module (from onnxruntime or onnxruntime-gpu), or an error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeUnavailableError(f"{ONNXRUNTIME_HELP} ({e})") from e
    return onnxruntime


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def session_options(threads: int):
    """The server's ONNX Runtime settings: ``threads`` intra-op threads, no spinning, every graph rewrite."""
    ort = import_onnxruntime()

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
    task costs about its weights, not a copy of the activation buffers.
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
    ort = import_onnxruntime()

    _share_head_allocator()
    so = session_options(1)
    # Basic rewrites only: the extended ones found nothing to speed up in a head and cost memory.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_mem_pattern = False  # no per-session pre-planned buffers: the shared arena serves them
    so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime ({e}); re-run `fpt-deploy export`") from e
