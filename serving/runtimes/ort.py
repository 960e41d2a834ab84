"""The ``ort`` runtime: the backbone's ONNX graph on ONNX Runtime's CPU provider. Torch-free.

Each batch gathers every row's norm parameters with one vectorised ``np.take`` and feeds the backbone
graph (``hidden``, ``attention_mask``, ``norm_weight``, ``norm_bias``). The graph is the repository's
portable file rewritten for ONNX Runtime (``ort_rewrite``), cached beside it after the first start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime
from fpt_deploy.serving.runtimes.ort_rewrite import ort_graph
from fpt_deploy.serving.runtimes.sessions import import_onnxruntime, physical_cores, session_options

from fpt_deploy.artifacts import BACKBONE_INPUTS, BACKBONE_OUTPUT
from fpt_deploy.errors import ArtifactError

log = logging.getLogger(__name__)


class OrtRuntime(Runtime):
    """The backbone ONNX on ONNX Runtime; a subclass picks other execution providers."""

    name = "ort"
    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)

    def __init__(
        self, backbone_file: Path, norm_weight: np.ndarray, norm_bias: np.ndarray, *, threads: int | None = None
    ) -> None:
        ort = import_onnxruntime()
        super().__init__(norm_weight, norm_bias)
        self.threads = threads or physical_cores()
        self.check_available()
        try:
            with ort_graph(backbone_file) as graph:  # the portable file, rewritten for ONNX Runtime
                options = session_options(self.threads)
                self.session = ort.InferenceSession(graph, options, providers=list(self.providers))
        except Exception as e:  # device init failures and unreadable graphs both land here
            raise ArtifactError(f"{backbone_file} cannot be loaded by ONNX Runtime ({e})") from e
        self.check_session()
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(BACKBONE_INPUTS):
            raise ArtifactError(f"{backbone_file} has inputs {names}; a backbone needs {list(BACKBONE_INPUTS)}")
        log.info("backbone %s on %s with %d intra-op threads", Path(backbone_file).name, self.name, self.threads)

    def check_available(self) -> None:
        """Raise ``RuntimeUnavailableError`` when this install cannot run the providers (CPU always can)."""

    def check_session(self) -> None:
        """Raise ``RuntimeUnavailableError`` when the session fell back from the providers asked for."""

    def run_backbone(self, hidden, attention_mask, task_index):
        weight, bias = self._tables  # one read: a concurrent set_norm_tables swaps both at once
        feeds = {
            "hidden": hidden,
            "attention_mask": attention_mask,
            "norm_weight": np.take(weight, task_index, axis=0),  # (B, N_norm, D), one gather
            "norm_bias": np.take(bias, task_index, axis=0),
        }
        return self.session.run([BACKBONE_OUTPUT], feeds)[0]
