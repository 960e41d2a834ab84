"""Export settings: one dataclass, validated at once; the CLI is derived from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fpt_deploy.choices import choice_problems
from fpt_deploy.data_fields import data_dir_field, download_field
from fpt_deploy.errors import collect

MIN_OPSET = 17  # LayerNormalization is a standard op from opset 17 (docs/architecture.md, "The body contract")
Quantization = Literal["int8"]


@dataclass(kw_only=True)
class ExportConfig:
    """What to export and how strictly to check it; ``fpt-deploy export``'s options are these fields.

    Tasks come from ``tasks`` (their checkpoints default to ``runs/<task>/best``), or from
    ``checkpoints`` alone (each checkpoint names its task). When both are given they pair up in order.
    """

    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Task to export (repeatable, or a comma list).", "flags": ("--task", "-t")},
    )
    checkpoints: list[Path] = field(
        default_factory=list,
        metadata={
            "help": "Checkpoint or run folder, one per --task in order (default runs/<task>/best); alone, "
            "it names its own task.",
            "flags": ("--checkpoint",),
        },
    )
    repo: Path = field(
        default=Path("deploy"), metadata={"help": "Deployment repository to write into (created if missing)."}
    )
    opset: int = field(default=18, metadata={"help": f"ONNX opset of every graph (>= {MIN_OPSET})."})
    quantize: Quantization | None = field(
        default=None,
        metadata={"help": "Also write a quantized backbone variant (ORT dynamic int8), checked for accuracy."},
    )
    force: bool = field(
        default=False, metadata={"help": "Keep the int8 variant even if a task loses more than the tolerance."}
    )
    atol: float = field(
        default=1e-4, metadata={"help": "Largest allowed |ONNX Runtime - PyTorch| on logits (and hidden states)."}
    )
    accuracy_tolerance: float = field(
        default=0.5, metadata={"help": "Largest allowed held-out accuracy loss of int8, in points (0-100)."}
    )
    validation_rows: int = field(
        default=256, metadata={"help": "Held-out rows per task for the ONNX Runtime vs PyTorch check."}
    )
    data_dir: Path | None = data_dir_field()
    download: bool = download_field()

    def __post_init__(self) -> None:
        self.tasks = [t.strip() for item in self.tasks for t in item.split(",") if t.strip()]
        self.checkpoints = [Path(c) for c in self.checkpoints]
        problems = choice_problems(self)
        if not self.tasks and not self.checkpoints:
            problems.append("name at least one task (--task) or checkpoint (--checkpoint)")
        if self.tasks and self.checkpoints and len(self.tasks) != len(self.checkpoints):
            problems.append(
                f"{len(self.tasks)} tasks but {len(self.checkpoints)} checkpoints; give one checkpoint "
                "per task, in the same order, or none to use runs/<task>/best"
            )
        if len(set(self.tasks)) != len(self.tasks):
            problems.append(f"a task is named twice in {', '.join(self.tasks)}")
        if self.opset < MIN_OPSET:
            problems.append(f"opset must be >= {MIN_OPSET} (got {self.opset})")
        if not self.atol > 0:
            problems.append(f"atol must be > 0 (got {self.atol})")
        if not 0 <= self.accuracy_tolerance <= 100:
            problems.append(f"accuracy tolerance must be between 0 and 100 points (got {self.accuracy_tolerance})")
        if self.validation_rows < 1:
            problems.append(f"validation rows must be >= 1 (got {self.validation_rows})")
        collect(problems)
        self.repo = Path(self.repo)
        self.data_dir = Path(self.data_dir) if self.data_dir else None

    def checkpoint_paths(self) -> list[Path]:
        """One checkpoint per exported task, in order."""
        return self.checkpoints or [Path("runs") / t / "best" for t in self.tasks]
