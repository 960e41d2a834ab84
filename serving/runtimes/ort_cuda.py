"""The ``ort-cuda`` runtime: the ``ort`` runtime on ONNX Runtime's CUDA execution provider.

Same graph (and same cached rewrite) as ``ort``; it needs the ``onnxruntime-gpu`` build of ONNX
Runtime, installed in place of ``onnxruntime`` (``pip install 'fpt-deploy[gpu]'``).
"""

from __future__ import annotations

from typing import ClassVar

from fpt_deploy.serving.runtimes.ort import OrtRuntime

from fpt_deploy.errors import RuntimeUnavailableError


class OrtCudaRuntime(OrtRuntime):
    name = "ort-cuda"
    providers: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def check_available(self) -> None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeUnavailableError(
                "--runtime ort-cuda needs ONNX Runtime's CUDAExecutionProvider, which this install lacks "
                f"(has {', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu in place of "
                "onnxruntime, or use --runtime ort"
            )

    def check_session(self) -> None:
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeUnavailableError(
                "ONNX Runtime could not start its CUDA provider (no usable GPU?); use --runtime ort"
            )
