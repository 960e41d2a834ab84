"""The interface every backbone runtime implements (docs/architecture.md, "The body contract"). Torch-free.

A runtime holds the norm tables of the served tasks, (T, N_norm, D) each, and runs a batch that mixes
tasks given one ``task_index`` per row: row ``i`` of the tables is the task with index ``i``. Tables
are replaced whole (``set_norm_tables``) when tasks are loaded or unloaded while the server runs; a
batch already running keeps the tables it started with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fpt_deploy.errors import ArtifactError

if TYPE_CHECKING:
    from fpt_deploy.serving.config import RuntimeConfig

    from fpt_deploy.artifacts import BackboneArtifact


def check_norm_tables(
    norm_weight: np.ndarray, norm_bias: np.ndarray, like: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Both tables as contiguous float32 (T, N_norm, D), with ``like``'s (N_norm, D) when given."""
    weight = np.ascontiguousarray(norm_weight, dtype=np.float32)
    bias = np.ascontiguousarray(norm_bias, dtype=np.float32)
    if weight.shape != bias.shape or weight.ndim != 3:
        raise ArtifactError(f"norm tables must both be (T, N_norm, D); got {weight.shape}, {bias.shape}")
    if like is not None and weight.shape[1:] != like.shape[1:]:
        raise ArtifactError(
            f"norm tables of shape {weight.shape} do not fit this backbone's (T, {', '.join(map(str, like.shape[1:]))})"
        )
    return weight, bias


class Runtime(ABC):
    """Executes the backbone on a batch of rows that may belong to different tasks.

    A subclass sets ``name`` (what ``--runtime`` says), implements ``run_backbone``, and overrides
    ``backbone_file`` when it executes something other than the repository's ONNX graph. Its
    constructor takes ``(backbone_file, norm_weight, norm_bias, *, threads=None)``.
    """

    name: ClassVar[str] = ""

    def __init__(self, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        self._tables = check_norm_tables(norm_weight, norm_bias)  # one tuple: a swap is atomic

    @classmethod
    def from_config(
        cls, backbone_file: Path, norm_weight: np.ndarray, norm_bias: np.ndarray, config: RuntimeConfig
    ) -> Runtime:
        """The runtime as ``config`` sets it up; a runtime with options of its own (``--device``) overrides this."""
        return cls(backbone_file, norm_weight, norm_bias, threads=config.threads)

    @classmethod
    def backbone_file(cls, backbone: BackboneArtifact, root: Path, variant: str) -> Path:
        """The file this runtime executes for ``variant`` of ``backbone``: by default its ONNX graph."""
        return backbone.path(root, variant)

    @property
    def norm_weight(self) -> np.ndarray:
        return self._tables[0]  # (T, N_norm, D)

    @property
    def norm_bias(self) -> np.ndarray:
        return self._tables[1]  # (T, N_norm, D)

    @property
    def num_tasks(self) -> int:
        return self._tables[0].shape[0]

    def set_norm_tables(self, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        """Replace the norm tables (tasks loaded or unloaded live); same (N_norm, D), any number of rows.

        Takes effect from the next ``run_backbone`` call. A runtime that keeps the tables elsewhere
        (on a device) overrides this, calls it, then copies them there.
        """
        self._tables = check_norm_tables(norm_weight, norm_bias, like=self._tables[0])

    def check_capacity(self, *, max_batch_size: int, seq_lens: dict[str, int]) -> None:  # noqa: B027
        """Raise ``ConfigError`` if batches of ``max_batch_size`` rows, a task's ``seq_lens`` tokens or
        ``num_tasks`` tasks exceed what this runtime can run (engines built for fixed maxima); no limit here."""

    @abstractmethod
    def run_backbone(self, hidden: np.ndarray, attention_mask: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """hidden (B, L, D) float32, attention_mask (B, L) int64, task_index (B,) int64 -> last_hidden (B, L, D)."""

    def close(self) -> None:  # noqa: B027  (optional hook: most runtimes hold nothing to release)
        """Release device resources (a no-op where there are none)."""
