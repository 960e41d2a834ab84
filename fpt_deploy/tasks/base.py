"""What a task is: the shape of its raw input, its preprocessing, its data, and how it is read out.

Preprocessing is a torch module inside the model's input head, so training and the exported input
ONNX run the same code and a client sends the raw input (DESIGN.md, "Tasks").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fpt_deploy.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """Everything that shapes a task's heads; saved in checkpoints and task JSONs."""

    name: str
    input_shape: tuple[int, ...]  # one raw example, as a client sends it (no batch dim)
    input_dtype: str  # numpy dtype name of the raw input
    seq_len: int  # tokens after preprocessing
    token_dim: int  # values per token fed to the input Linear; 0 for token-id tasks
    vocab_size: int  # > 0 for token-id tasks (an Embedding input layer), else 0
    num_classes: int  # classes per output
    read_tokens: int  # how many last (real) tokens the output head reads
    outputs_per_token: int  # outputs each read token predicts (bit tasks: patch bits)
    labels: tuple[str, ...]  # class names
    options: dict = field(default_factory=dict)  # the task's option values (n, patch, max_len, ...)

    @property
    def num_outputs(self) -> int:
        """Predictions per example: 1 for classification, n bits for the bit tasks."""
        return self.read_tokens * self.outputs_per_token

    @property
    def logits_shape(self) -> tuple[int, ...]:
        """Logits of one example: (C,) for classification, (num_outputs, C) otherwise."""
        return (self.num_classes,) if self.num_outputs == 1 else (self.num_outputs, self.num_classes)

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_shape"], d["labels"] = list(self.input_shape), list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TaskSpec:
        return cls(**{**d, "input_shape": tuple(d["input_shape"]), "labels": tuple(d["labels"])})


@dataclass
class TaskData:
    inputs: np.ndarray  # (N, *input_shape), raw, input_dtype
    labels: np.ndarray  # (N,) or (N, num_outputs), int64
    source: str  # where it came from, for the log


class Task(ABC):
    """Base class. A task module subclasses it and registers it with ``register_task``."""

    name: str = ""
    description: str = ""
    default_options: dict = {}

    def __init__(self, **options) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(f"{k}={v}" for k, v in self.default_options.items()) or "none"
            raise ConfigError(f"task {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        self.options = {k: type(v)(options.get(k, v)) for k, v in self.default_options.items()}
        self.spec = self.build_spec()

    @abstractmethod
    def build_spec(self) -> TaskSpec:
        """The task's shapes, classes and read-out, from its options."""

    @abstractmethod
    def build_preprocess(self):
        """A parameter-free torch module: raw input batch -> (B, L, token_dim) float or (B, L) ids."""

    @abstractmethod
    def load_data(self, split: str, data_dir: Path | None = None, download: bool = False, seed: int = 0) -> TaskData:
        """The raw ``split`` ("train" or "test") of this task's data set."""


def parse_options(pairs: list[str]) -> dict:
    """``["n=100", "patch=10"]`` -> ``{"n": "100", "patch": "10"}`` (tasks cast the values)."""
    out, bad = {}, [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"task options must look like KEY=VALUE, got {', '.join(bad)}")
    for p in pairs:
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out
