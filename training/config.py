"""Training settings: one dataclass, validated at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fpt_deploy.errors import collect


@dataclass
class TrainConfig:
    task: str = "mnist"  # registered task name
    task_options: dict = field(default_factory=dict)  # e.g. {"n": 100, "patch": 10} for bit-memory
    backbone: str = "minilm"  # registered backbone name or a local Hugging Face folder
    epochs: int = 3  # passes over the training split (ignored when ``steps`` is set)
    steps: int | None = None  # total optimizer steps; overrides ``epochs``
    batch_size: int = 32
    lr: float = 1e-3  # Adam, the paper's setting (peak lr under the cosine schedule)
    schedule: str = "cosine"  # cosine (linear warmup, then cosine decay to 0) | constant (the paper's)
    warmup_steps: int = 50  # linear warmup for the cosine schedule (at most a tenth of the run)
    grad_clip: float = 1.0  # max grad norm, the paper's setting
    eval_every: int | None = None  # steps between evaluations; default once an epoch
    stop_at_accuracy: float | None = None  # stop once held-out accuracy reaches this
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool | None = None  # bf16 autocast; default on for CUDA, off for CPU
    dist_backend: str = "auto"  # under torchrun: auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    seed: int = 0
    out: Path | None = None  # run folder; default runs/<task>
    resume: bool = False  # continue from <out>/last
    data_dir: Path | None = None
    download: bool = False  # let torchvision download the data set
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be cosine or constant (got {self.schedule!r})")
        if self.warmup_steps < 0:
            problems.append(f"warmup steps must be >= 0 (got {self.warmup_steps})")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append(f"eval-every must be >= 1 (got {self.eval_every})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            problems.append(f"dist-backend must be auto, nccl or gloo (got {self.dist_backend!r})")
        collect(problems)
        self.out = Path(self.out) if self.out else Path("runs") / self.task
        self.data_dir = Path(self.data_dir) if self.data_dir else None
