"""Export settings: one dataclass, validated at once (STYLE.md, "one dataclass per concern")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fpt_deploy.errors import collect

MIN_OPSET = 17  # LayerNormalization is a standard op from opset 17 (DESIGN.md: opset >= 17)
QUANTIZATIONS = ("int8",)


@dataclass
class ExportConfig:
    """What to export and how strictly to check it.

    Tasks come from ``tasks`` (their checkpoints default to ``runs/<task>/best``), or from
    ``checkpoints`` alone (each checkpoint names its task). When both are given they pair up in order.
    """

    tasks: list[str] = field(default_factory=list)  # registered task names
    checkpoints: list[Path] = field(default_factory=list)  # checkpoint or run folders
    repo: Path = Path("deploy")  # the deployment repository to write into (created if missing)
    opset: int = 18  # ONNX opset of every graph; the torch exporter's native one is 18
    quantize: str | None = None  # "int8": also write an int8 backbone variant (ORT dynamic quantization)
    force: bool = False  # keep the int8 variant even when a task loses more than ``accuracy_tolerance``
    atol: float = 1e-4  # largest allowed |ORT - PyTorch| on logits (and on the backbone's hidden states)
    accuracy_tolerance: float = 0.5  # largest allowed held-out accuracy loss of int8, in points (0-100)
    validation_rows: int = 256  # held-out rows per task for the ORT-vs-PyTorch parity check
    data_dir: Path | None = None  # data in torchvision's layout (MNIST, CIFAR-10); else the task's default
    download: bool = False  # let torchvision download a data set

    def __post_init__(self) -> None:
        self.tasks = [t for t in self.tasks if t]
        self.checkpoints = [Path(c) for c in self.checkpoints]
        problems = []
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
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            problems.append(f"quantize must be one of {', '.join(QUANTIZATIONS)} (got {self.quantize!r})")
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
