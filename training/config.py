"""Training settings: one dataclass per command, each validated at once; the CLI is derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fpt_deploy.choices import choice_problems
from fpt_deploy.data_fields import data_dir_field, download_field
from fpt_deploy.errors import collect
from fpt_deploy.model_options import ModelOptions
from fpt_deploy.tasks.recipe import Schedule

Device = Literal["auto", "cpu", "cuda"]
DistBackend = Literal["auto", "nccl", "gloo"]


def _device_field():
    return field(default="auto", metadata={"help": "auto picks CUDA when a GPU is visible."})


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how: ``fpt-deploy train``'s options are these fields (fpt_deploy/cli_options.py)."""

    task: str = field(default="mnist", metadata={"help": "Registered task name (see `fpt-deploy tasks`)."})
    task_options: dict = field(
        default_factory=dict, metadata={"cli": False, "help": "The task's options, e.g. {'n': 100}."}
    )
    task_file: Path | None = field(
        default=None, metadata={"help": "Your own task, declared in a TOML file (docs/declared-tasks.md)."}
    )
    backbone: str = field(
        default="minilm",
        metadata={
            "help": "Backbone name (see `fpt-deploy backbones`) or local HF folder.",
            "flags": ("--backbone", "-b"),
        },
    )
    # lr, epochs, steps, schedule: None = the task's recipe, else fpt_deploy.tasks.recipe.DEFAULT_RECIPE
    epochs: int | None = field(
        default=None, metadata={"help": "Passes over the training data (default: the task's recipe, else 3)."}
    )
    steps: int | None = field(default=None, metadata={"help": "Total optimizer steps; overrides --epochs."})
    batch_size: int = field(
        default=32, metadata={"help": "Examples per step; under torchrun the global batch, split across ranks."}
    )
    lr: float | None = field(
        default=None, metadata={"help": "Adam (peak) learning rate (default: the task's recipe, else 1e-3)."}
    )
    schedule: Schedule | None = field(
        default=None,
        metadata={
            "help": "cosine (the default): linear warmup then cosine decay to 0; constant: the paper's "
            "(default: the task's recipe)."
        },
    )
    warmup_steps: int = field(
        default=50, metadata={"help": "Linear warmup of the cosine schedule (at most a tenth of the run)."}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Largest gradient norm (the paper's 1.0)."})
    eval_every: int | None = field(
        default=None, metadata={"help": "Steps between held-out evaluations (default: once an epoch)."}
    )
    stop_at_accuracy: float | None = field(
        default=None,
        metadata={"help": "Stop once held-out accuracy reaches this (e.g. 1.0).", "aliases": ("--stop-at",)},
    )
    device: Device = _device_field()
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on for CUDA, off on CPU)."})
    dist_backend: DistBackend = field(
        default="auto", metadata={"help": "torch.distributed backend under torchrun: auto = NCCL on GPUs, gloo on CPU."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (data order, init, generated data)."})
    out: Path | None = field(
        default=None, metadata={"help": "Run folder (default runs/<task>); the best checkpoint goes to OUT/best."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in OUT from its last saved state."})
    data_dir: Path | None = data_dir_field()
    download: bool = download_field()
    progress: bool = field(default=True, metadata={"cli": False, "help": "Show a progress bar."})
    # What trains and the reference's other model options: each of its fields is an option of its own
    model: ModelOptions = field(default_factory=ModelOptions, metadata={"help": "How the model is built."})
    augment: bool = field(
        default=False,
        metadata={
            "help": "Image tasks: random crop (4-pixel padding), horizontal flip, rotation up to 20 degrees "
            "(the reference's CIFAR-10 transforms)."
        },
    )
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the training data held out (seeded) to choose the best checkpoint and stop early; "
            "the test split is only ever reported."
        },
    )

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if isinstance(self.model, dict):  # from JSON or a plain mapping
            self.model = ModelOptions(**self.model)
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.warmup_steps < 0:
            problems.append(f"warmup steps must be >= 0 (got {self.warmup_steps})")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append(f"eval-every must be >= 1 (got {self.eval_every})")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val-fraction must be in [0, 1) (got {self.val_fraction})")
        collect(problems)
        if self.task_file is not None:
            from fpt_deploy.tasks.specfile import task_file_name

            self.task_file = Path(self.task_file)
            self.task = task_file_name(self.task_file)
            self.task_options = {**self.task_options, "file": str(self.task_file)}
        self.out = Path(self.out) if self.out else Path("runs") / self.task
        self.data_dir = Path(self.data_dir) if self.data_dir else None

    def with_recipe(self, recipe) -> TrainConfig:
        """This config with lr, epochs, steps and schedule resolved: given, else ``recipe``'s, else the default."""
        from fpt_deploy.tasks.recipe import resolve_recipe

        return dataclasses.replace(self, **resolve_recipe(vars(self), recipe))


@dataclass(kw_only=True)
class EvaluateConfig:
    """``fpt-deploy evaluate``: a checkpoint's held-out accuracy."""

    checkpoint: Path = field(metadata={"help": "Checkpoint folder (or a run folder: its best checkpoint)."})
    data_dir: Path | None = data_dir_field()
    download: bool = download_field()
    device: Device = _device_field()
    batch_size: int = field(default=128, metadata={"help": "Examples per forward pass."})
    split: Literal["test", "val"] = field(
        default="test",
        metadata={"help": "test: the split no choice saw; val: the validation split the run carved and chose on."},
    )

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        collect(problems)
        self.checkpoint = Path(self.checkpoint)
        self.data_dir = Path(self.data_dir) if self.data_dir else None
