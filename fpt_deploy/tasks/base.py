"""What a task is: the shape of its raw input, its preprocessing, its data, and how it is read out.

Preprocessing is a torch module inside the model's input head, so training and the exported input
ONNX run the same code and a client sends the raw input (docs/architecture.md). ``TaskSpec`` and
``TaskOption`` live in the torch-free ``fpt_deploy.taskspec``; they are re-exported here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpt_deploy.errors import ConfigError
from fpt_deploy.tasks.recipe import Recipe
from fpt_deploy.taskspec import TaskOption, TaskSpec, parse_task_options

__all__ = ["Task", "TaskData", "TaskOption", "TaskSpec", "TokenTask", "parse_options"]


@dataclass(kw_only=True)
class TaskData:
    inputs: np.ndarray  # (N, *input_shape), raw, input_dtype
    labels: np.ndarray  # (N,) or (N, num_outputs), int64
    source: str  # where it came from, for the log


class Task(ABC):
    """Base class. A task module subclasses it and registers it with ``register_task``."""

    name: str = ""
    description: str = ""
    declared_options: dict[str, TaskOption] = {}  # name -> type, default, help
    recipe: Recipe | None = None  # recommended lr/epochs/steps/schedule, used where the user gives none

    def __init__(self, **options) -> None:
        """``options`` by name, as strings (``-o n=100``) or typed values (a checkpoint's JSON)."""
        self.options = parse_task_options(self.name, self.declared_options, options)
        self.spec = self.build_spec()

    @classmethod
    def option_defaults(cls) -> dict:
        return {k: o.default for k, o in cls.declared_options.items()}

    @abstractmethod
    def build_spec(self) -> TaskSpec:
        """The task's shapes, classes and read-out, from its options."""

    @abstractmethod
    def build_preprocess(self):
        """A parameter-free torch module: raw input batch -> (B, L, token_dim) float or (B, L) ids."""

    @abstractmethod
    def load_data(self, split: str, data_dir: Path | None = None, download: bool = False, seed: int = 0) -> TaskData:
        """The raw ``split`` ("train" or "test") of this task's data set."""


class TokenTask(Task):
    """A task whose raw input is ``max_len`` token ids (0 = padding), read out as one of ``num_classes``.

    A subclass sets ``vocab_size`` and ``num_classes``, declares a ``max_len`` option, and loads data.
    """

    vocab_size: int
    num_classes: int

    def build_spec(self) -> TaskSpec:
        L = self.options["max_len"]
        return TaskSpec(
            name=self.name,
            input_shape=(L,),
            input_dtype="int64",
            seq_len=L,
            vocab_size=self.vocab_size,
            num_classes=self.num_classes,
            labels=tuple(str(i) for i in range(self.num_classes)),
            options=self.options,
        )

    def build_preprocess(self):
        from fpt_deploy.tasks.preprocess import TokenIds

        return TokenIds()


def parse_options(pairs: list[str]) -> dict:
    """``["n=100", "patch=10"]`` -> ``{"n": "100", "patch": "10"}`` (tasks parse them by declared type)."""
    out, bad = {}, [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"task options must look like KEY=VALUE, got {', '.join(bad)}")
    for p in pairs:
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out
