"""Serving settings: one dataclass for the server, one for offline prediction, each validated at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fpt_deploy.errors import collect

RUNTIMES = ("ort", "ort-cuda", "tensorrt")


@dataclass
class RuntimeConfig:
    """How the shared backbone and the per-task heads execute (shared by ``serve`` and ``predict``)."""

    repo: Path  # deployment repository written by `fpt-deploy export`
    runtime: str = "ort"  # ort (CPU) | ort-cuda | tensorrt
    backbone_variant: str = "fp32"  # which backbone file of the repository: fp32, int8, ...
    fingerprint: str | None = None  # prefix of the backbone fingerprint to run when the repository holds several
    engine: Path | None = None  # TensorRT engine file; default: the one `fpt-deploy build-engine` wrote
    threads: int | None = None  # ONNX Runtime intra-op threads for the backbone; default: physical cores
    max_batch_size: int = 32  # rows per batch (and per backbone call)
    max_queue_delay_ms: float = 2.0  # how long the first queued request waits for others to join
    max_queue_size: int = 1024  # queued requests beyond which new ones are refused (503)
    pad_tolerance: float = 0.25  # extra padded tokens (fraction of real ones) allowed to merge lengths

    def problems(self) -> list[str]:
        problems = []
        if self.runtime not in RUNTIMES:
            problems.append(f"runtime must be one of {', '.join(RUNTIMES)} (got {self.runtime!r})")
        if self.max_batch_size < 1:
            problems.append(f"max batch size must be >= 1 (got {self.max_batch_size})")
        if not 0 <= self.max_queue_delay_ms <= 60_000:
            problems.append(f"max queue delay must be within 0..60000 ms (got {self.max_queue_delay_ms})")
        if self.max_queue_size < 1:
            problems.append(f"max queue size must be >= 1 (got {self.max_queue_size})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if not self.pad_tolerance >= 0:
            problems.append(f"pad tolerance must be >= 0 (got {self.pad_tolerance})")
        return problems


@dataclass
class ServeConfig(RuntimeConfig):
    """``fpt-deploy serve``: an Open Inference Protocol (KServe v2) server over one backbone."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 << 20  # larger request bodies get 413
    graceful_timeout_s: float = 30.0  # how long shutdown waits for in-flight requests

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        problems = self.problems()
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be within 0..65535 (got {self.port})")
        if self.max_body_bytes < 1024:
            problems.append(f"max body bytes must be >= 1024 (got {self.max_body_bytes})")
        if self.graceful_timeout_s < 0:
            problems.append(f"graceful timeout must be >= 0 (got {self.graceful_timeout_s})")
        collect(problems)


@dataclass
class PredictConfig(RuntimeConfig):
    """``fpt-deploy predict``: offline batch inference of one task through the serving runtime."""

    task: str = ""
    input: Path = Path()  # .npy of raw inputs, (N, *input_shape)
    output: Path | None = None  # .npz or .json; nothing written when None

    def __post_init__(self) -> None:
        self.repo, self.input = Path(self.repo), Path(self.input)
        self.output = Path(self.output) if self.output else None
        problems = self.problems()
        if not self.task:
            problems.append("a task name is required (--task)")
        if self.input.suffix != ".npy":
            problems.append(f"input must be a .npy file (got {self.input})")
        if self.output is not None and self.output.suffix not in (".npz", ".json"):
            problems.append(f"output must end in .npz or .json (got {self.output})")
        collect(problems)
