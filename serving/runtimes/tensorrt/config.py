"""``fpt-deploy build-engine``'s options and the engine's names: cheap to import (no TensorRT, CUDA or ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpt_deploy.artifacts import BACKBONE_OUTPUT, NORM_TABLE_INPUTS, TASK_INDEX_INPUT
from fpt_deploy.errors import ConfigError, collect

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
