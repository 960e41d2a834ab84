"""The ``ort-cuda`` runtime: the ``ort`` runtime on ONNX Runtime's CUDA execution provider.

Same graph (and same cached rewrite) as ``ort``; it needs the ``onnxruntime-gpu`` build of ONNX
Runtime, installed in place of ``onnxruntime`` (``pip install 'fpt-deploy[gpu]'``). Its CUDA provider
links the CUDA and cuDNN libraries of the pip wheels (``nvidia/cu13/lib``, ``nvidia/cudnn/lib``), which
the dynamic loader finds only after ``onnxruntime.preload_dlls()``: it is called before the session
opens, and when the provider still cannot start, the error names the library the loader missed.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import ClassVar

from fpt_deploy.serving.runtimes.ort import OrtRuntime
from fpt_deploy.serving.runtimes.sessions import import_onnxruntime

from fpt_deploy.errors import RuntimeUnavailableError

log = logging.getLogger(__name__)
DRIVER_LIBRARY = "libcuda.so"  # installed with the NVIDIA driver (CUDA 13 wheels need driver >= 580)


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries of the nvidia pip wheels into the process (ONNX Runtime >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        log.debug("onnxruntime %s has no preload_dlls: CUDA libraries come from the system paths", ort.__version__)
        return
    try:
        preload()
    except Exception as e:  # a missing wheel is reported when the provider fails, with the library's name
        log.warning("onnxruntime.preload_dlls() failed: %s", e)


def missing_cuda_library(ort) -> str:
    """Why the CUDA provider library cannot load here (the loader names the missing library), or ""."""
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    provider = Path(ort.__file__).parent / "capi" / name
    if not provider.is_file():
        return f"{name} is absent: this onnxruntime is not the onnxruntime-gpu build"
    try:
        ctypes.CDLL(str(provider))
    except OSError as e:
        return str(e)
    return ""


class OrtCudaRuntime(OrtRuntime):
    name = "ort-cuda"
    providers: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def check_available(self) -> None:
        ort = import_onnxruntime()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeUnavailableError(
                "--runtime ort-cuda needs ONNX Runtime's CUDAExecutionProvider, which this install lacks "
                f"(has {', '.join(ort.get_available_providers())}): pip uninstall onnxruntime, then "
                "pip install 'fpt-deploy[gpu]' (onnxruntime-gpu); or use --runtime ort"
            )
        preload_cuda_libraries(ort)

    def check_session(self) -> None:
        if "CUDAExecutionProvider" not in self.session.get_providers():
            why = missing_cuda_library(import_onnxruntime())
            if not why:
                hint = "no usable GPU or driver?"
            elif DRIVER_LIBRARY in why:  # the driver's own library, never in a wheel
                hint = f"{why}: no NVIDIA driver on this machine; it needs an NVIDIA GPU with driver >= 580"
            else:
                hint = f"{why}; install the CUDA 13 and cuDNN 9 wheels: pip install 'fpt-deploy[gpu]'"
            raise RuntimeUnavailableError(
                f"ONNX Runtime could not start its CUDA provider ({hint}); or use --runtime ort"
            )
