"""Serving settings: one dataclass for the server, one for offline prediction, each validated at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fpt_deploy.serving.runtimes import runtime_names

from fpt_deploy.errors import collect


@dataclass
class RuntimeConfig:
    """How the shared backbone and the per-task heads execute (shared by ``serve`` and ``predict``)."""

    repo: Path  # deployment repository written by `fpt-deploy export`
    runtime: str = "ort"  # a name in serving.runtimes' registry: ort (CPU), ort-cuda, tensorrt, ...
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
        if self.runtime not in runtime_names():
            problems.append(f"runtime must be one of {', '.join(runtime_names())} (got {self.runtime!r})")
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
    # Limits on what clients may send; serving/server.py lists the status each refusal gets.
    max_header_bytes: int = field(
        default=16 << 10, metadata={"help": "Request line and headers larger than this get 431."}
    )
    max_body_bytes: int = field(
        default=64 << 20,
        metadata={"help": "Request bodies larger than this get 413 (a model's bound from its shape may be lower)."},
    )
    max_buffered_bytes: int = field(
        default=256 << 20,
        metadata={"help": "Request body bytes held across all connections; a request beyond it gets 503."},
    )
    max_queue_rows: int = field(
        default=256, metadata={"help": "Rows waiting in the batcher beyond which a request gets 503."}
    )
    header_timeout_s: float = field(
        default=10.0, metadata={"help": "Seconds a client has to send a request's headers (then 408, closed)."}
    )
    body_timeout_s: float = field(
        default=10.0, metadata={"help": "Seconds a request body may go without data (then 408, closed)."}
    )
    keep_alive_timeout_s: float = field(
        default=5.0, metadata={"help": "Seconds an idle keep-alive connection stays open."}
    )
    json_max_depth: int = field(default=32, metadata={"help": "Deepest nesting of arrays/objects in request JSON."})
    json_max_number_chars: int = field(
        default=64, metadata={"help": "Most characters in one number of request JSON."}
    )
    graceful_timeout_s: float = field(
        default=30.0,
        metadata={"help": "Shutdown grace: in-flight requests finish within it; stalled uploads are dropped."},
    )

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        problems = self.problems()
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be within 0..65535 (got {self.port})")
        problems += self.limit_problems()
        collect(problems)

    def limit_problems(self) -> list[str]:
        at_least = {
            "max header bytes": (self.max_header_bytes, 1024),
            "max body bytes": (self.max_body_bytes, 1024),
            "max buffered bytes": (self.max_buffered_bytes, 1024),
            "max queue rows": (self.max_queue_rows, self.max_batch_size),
            "json max depth": (self.json_max_depth, 8),
            "json max number chars": (self.json_max_number_chars, 24),
        }
        problems = [f"{name} must be >= {low} (got {value})" for name, (value, low) in at_least.items() if value < low]
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "graceful_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name.replace('_', ' ')} must be > 0 (got {getattr(self, name)})")
        return problems


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
