"""The task contract that crosses packages: ``TaskSpec`` and declared task options. Torch-free.

Training builds a ``TaskSpec`` from a task's options, the checkpoint and the deployment repository's
``task.json`` carry it, and serving reads it back without importing torch (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from typing import Any

from fpt_deploy.errors import ConfigError, collect

OPTION_TYPES = (bool, int, float, str)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Everything that shapes a task's heads; saved in checkpoints and task JSONs."""

    name: str
    input_shape: tuple[int, ...]  # one raw example, as a client sends it (no batch dim)
    input_dtype: str  # numpy dtype name of the raw input
    seq_len: int  # tokens after preprocessing
    token_dim: int = 0  # values per token fed to the input Linear; 0 for token-id tasks
    vocab_size: int = 0  # > 0 for token-id tasks (an Embedding input layer), else 0
    num_classes: int  # classes per output
    read_tokens: int = 1  # how many last (real) tokens the output head reads
    outputs_per_token: int = 1  # outputs each read token predicts (bit tasks: patch bits)
    labels: tuple[str, ...]  # class names
    options: Mapping[str, Any] = field(default_factory=dict)  # the task's option values (n, patch, ...)

    def __post_init__(self) -> None:
        # JSON gives lists; the spec holds tuples so that two equal specs compare equal.
        shape = self.input_shape
        if isinstance(shape, str | bytes) or not all(isinstance(s, Integral) for s in shape):
            raise ConfigError(f"task {self.name!r}: input_shape must be a list of integers, got {shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        object.__setattr__(self, "options", dict(self.options))
        problems = []
        if (self.token_dim > 0) == (self.vocab_size > 0):
            problems.append(
                f"task {self.name!r}: exactly one of token_dim (got {self.token_dim}) and vocab_size "
                f"(got {self.vocab_size}) must be > 0"
            )
        for name in ("seq_len", "num_classes", "read_tokens", "outputs_per_token"):
            if getattr(self, name) < 1:
                problems.append(f"task {self.name!r}: {name} must be >= 1 (got {getattr(self, name)})")
        if len(self.labels) != self.num_classes:
            problems.append(f"task {self.name!r}: {len(self.labels)} labels for {self.num_classes} classes")
        collect(problems)

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
    def from_json(cls, d: Mapping) -> TaskSpec:
        """The spec ``to_json`` wrote (any earlier version too); a ``ConfigError`` names what is wrong."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"task spec has unknown fields {', '.join(unknown)}; a newer fpt-deploy wrote it")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"task spec is malformed ({e})") from e


@dataclass(frozen=True, kw_only=True)
class TaskOption:
    """One option a task declares: its type (bool, int, float or str), default and meaning."""

    type: type
    default: bool | int | float | str
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise TypeError(f"a task option's type is one of bool, int, float, str (got {self.type!r})")
        parse_option_value("default", self.type, self.default)  # the default itself must parse

    def describe(self) -> str:
        return f"{self.type.__name__}, default {self.default}" + (f": {self.help}" if self.help else "")


def parse_option_value(name: str, kind: type, value: Any) -> bool | int | float | str:
    """``value`` (a command-line string, or a JSON value) as ``kind``; a ``ConfigError`` names both otherwise.

    Booleans accept true/false, yes/no, on/off and 1/0 (any case); ints take no fraction.
    """
    text = str(value).strip()
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(text)
            except ValueError:
                pass
        elif isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(text)
            except ValueError:
                pass
    elif kind is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise ConfigError(f"option {name}={value!r} must be {expected}")


def parse_task_options(task: str, declared: Mapping[str, TaskOption], given: Mapping[str, Any]) -> dict:
    """Every declared option's value: ``given`` ones parsed by their declared type, the rest defaults.

    Unknown names and unparsable values are all reported in one ``ConfigError``.
    """
    problems = []
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(f"{k} ({o.describe()})" for k, o in declared.items()) or "none"
        problems.append(f"task {task!r} has no option {', '.join(unknown)}; its options: {known}")
    values = {}
    for key, option in declared.items():
        try:
            values[key] = parse_option_value(key, option.type, given.get(key, option.default))
        except ConfigError as e:
            problems.append(f"task {task!r}: {e}")
    collect(problems)
    return values
