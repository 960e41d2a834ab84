"""``--runtime tensorrt``: the engine ``fpt-deploy build-engine`` recorded, norm tables resident on the GPU."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime
from fpt_deploy.serving.runtimes.tensorrt.config import VARIANTS
from fpt_deploy.serving.runtimes.tensorrt.cuda import load_gpu_stack
from fpt_deploy.serving.runtimes.tensorrt.session import EngineCapacity, EngineSession

from fpt_deploy.artifacts import BackboneArtifact
from fpt_deploy.errors import ArtifactError

log = logging.getLogger(__name__)


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
