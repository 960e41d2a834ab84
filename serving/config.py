"""Serving settings: one dataclass for the server, one for offline prediction, each validated at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fpt_deploy.serving.runtimes import runtime_names

from fpt_deploy.choices import choice_problems
from fpt_deploy.errors import collect


@dataclass(kw_only=True)
class RuntimeConfig:
    """How the shared body and the per-task heads execute: the options ``serve`` and ``predict`` share.

    Each field is a command-line option of both (fpt_deploy/cli_options.py); a field added here
    appears on both commands.
    """

    repo: Path = field(metadata={"help": "Deployment repository written by `fpt-deploy export`."})
    runtime: str = field(
        default="ort",
        metadata={
            "help": "Runtime that runs the body: ort (ONNX Runtime CPU), ort-cuda (its CUDA provider), "
            "tensorrt (the engine `build-engine` wrote), torch (PyTorch on --device), or one a plug-in registered.",
            "choices": runtime_names,
        },
    )
    backbone_variant: str = field(
        default="fp32",
        metadata={"help": "Body file of the repository: fp32, int8 (`export --quantize int8`); fp16 for tensorrt."},
    )
    fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint (a prefix) of the body to run when the repository holds several.",
            "aliases": ("--backbone",),
        },
    )
    engine: Path | None = field(
        default=None, metadata={"help": "TensorRT engine file (default: the one recorded in the repository)."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "ONNX Runtime intra-op threads for the body (default: the physical cores)."}
    )
    # --runtime torch only (serving/runtimes/torch_runtime.py); the other runtimes ignore them.
    device: str | None = field(
        default=None,
        metadata={
            "help": "torch runtime: device of the body, cuda, cuda:1, cpu, mps (default: cuda if any, else cpu)."
        },
    )
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={"help": "torch runtime: body precision; bf16/fp16 are checked against the fp32 ONNX at load."},
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={"help": "torch runtime on cuda: replay one captured CUDA graph per batch/length bucket."},
    )
    max_batch_size: int = field(
        default=32, metadata={"help": "Rows per batch: requests of all tasks are batched together up to this many."}
    )
    max_queue_delay_ms: float = field(
        default=2.0, metadata={"help": "How long (ms) the oldest queued request waits for others to join its batch."}
    )
    max_queue_size: int = field(
        default=1024, metadata={"help": "Queued requests beyond which new ones are refused (503)."}
    )
    pad_tolerance: float = field(
        default=0.25, metadata={"help": "Padding (fraction of real tokens) allowed to merge lengths into one batch."}
    )

    def problems(self) -> list[str]:
        problems = choice_problems(self)
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


@dataclass(kw_only=True)
class ServeConfig(RuntimeConfig):
    """``fpt-deploy serve``: an Open Inference Protocol (KServe v2) server over one body.

    Its options are these fields and RuntimeConfig's; a field added here (with ``metadata={"help":
    ...}``) is a ``serve`` option at once.
    """

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 for every interface)."})
    port: int = field(default=8000, metadata={"help": "TCP port of the HTTP server."})
    # Limits on what clients may send; serving/server.py lists the status each refusal gets.
    max_header_bytes: int = field(
        default=16 << 10, metadata={"help": "Request line and headers larger than this get 431."}
    )
    max_body_bytes: int = field(
        default=64 << 20,
        metadata={
            "help": "Request bodies and gRPC messages larger than this get 413 / RESOURCE_EXHAUSTED (a model's "
            "bound from its shape may be lower)."
        },
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
    min_body_rate: float = field(
        default=1024.0,
        metadata={
            "help": "Bytes per second an unfinished request body must average over each --body-timeout-s "
            "window (then 408, closed), so a trickle cannot hold a connection; 0: no minimum."
        },
    )
    keep_alive_timeout_s: float = field(
        default=5.0, metadata={"help": "Seconds an idle keep-alive connection stays open."}
    )
    json_max_depth: int = field(default=32, metadata={"help": "Deepest nesting of arrays/objects in request JSON."})
    json_max_number_chars: int = field(default=64, metadata={"help": "Most characters in one number of request JSON."})
    graceful_timeout_s: float = field(
        default=30.0,
        metadata={"help": "Shutdown grace: in-flight requests finish within it; stalled uploads are dropped."},
    )
    # Operating the server (serving/extensions.py, serving/grpc_server.py): gRPC, live task loading, logs.
    grpc_port: int | None = field(
        default=None,
        metadata={"help": "Also serve the KServe v2 gRPC protocol (tritonclient.grpc) on this port, e.g. 8001."},
    )
    model_control_mode: Literal["none", "explicit", "poll"] = field(
        default="none",
        metadata={
            "help": "As Triton's: none serves the tasks found at start-up; explicit also loads and unloads "
            "tasks through /v2/repository/models/<task>/load and /unload; poll follows the manifest."
        },
    )
    load_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "As Triton's: with --model-control-mode explicit, a task to load at start-up (repeat the "
            "option for several; * for all); without it none is loaded. The other modes load every task."
        },
    )
    poll_interval: float = field(
        default=5.0, metadata={"help": "Seconds between two reads of the manifest in poll mode."}
    )
    access_log: bool = field(default=False, metadata={"help": "Log one line per HTTP request."})
    max_resident_tasks: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many tasks' rows in memory (at least --max-batch-size): the least "
            "recently used wait in a file on disk and are read back before their next batch. "
            "Default: every task's rows stay in memory."
        },
    )

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        problems = self.problems()
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be within 0..65535 (got {self.port})")
        problems += self.limit_problems()
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            problems.append(f"grpc port must be within 0..65535 (got {self.grpc_port})")
        if self.max_resident_tasks is not None and self.max_resident_tasks < self.max_batch_size:
            problems.append(
                f"max resident tasks must be >= max batch size {self.max_batch_size}, since one batch may hold "
                f"that many tasks (got {self.max_resident_tasks})"
            )
        if not self.poll_interval > 0:
            problems.append(f"poll interval must be > 0 seconds (got {self.poll_interval})")
        self.load_model = list(self.load_model)
        if "*" in self.load_model and len(self.load_model) > 1:
            problems.append("--load-model * loads every task and must be the only --load-model (as in Triton)")
        if any(not name.strip() for name in self.load_model):
            problems.append("--load-model needs a task name (or * for all)")
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
        if not self.min_body_rate >= 0:
            problems.append(f"min body rate must be >= 0 bytes/s (got {self.min_body_rate})")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "graceful_timeout_s"):
            if not getattr(self, name) > 0:
                label = name.removesuffix("_s").replace("_", " ")
                problems.append(f"{label} must be > 0 seconds (got {getattr(self, name)})")
        return problems


@dataclass(kw_only=True)
class PredictConfig(RuntimeConfig):
    """``fpt-deploy predict``: offline batch inference of one task through the serving runtime."""

    task: str = field(metadata={"help": "Task (model) name in the repository.", "flags": ("--task", "-t")})
    input: Path = field(metadata={"help": "Raw inputs as .npy, shaped (N, *input_shape), e.g. uint8 (N, 28, 28)."})
    output: Path | None = field(
        default=None, metadata={"help": "Write labels and probabilities to this .npz or .json."}
    )

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
