"""Choice checks read from a config dataclass's ``Literal`` annotations, so no config repeats its choices.

    @dataclass(kw_only=True)
    class TrainConfig:
        device: Literal["auto", "cpu", "cuda"] = "auto"

        def __post_init__(self) -> None:
            problems = choice_problems(self)  # "device must be one of auto, cpu, cuda (got 'tpu')"
            ...
            collect(problems)

The same annotations give the command line its choices (fpt_deploy/cli_options.py). Torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

C = TypeVar("C")


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other hint -> ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def literal_choices(hint: Any) -> tuple[tuple, bool, bool] | None:
    """``(choices, none_allowed, repeatable)`` of a ``Literal``, ``Literal | None`` or ``list[Literal]`` hint."""
    hint, none_allowed = unwrap_optional(hint)
    repeatable = typing.get_origin(hint) is list
    if repeatable:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is not Literal:
        return None
    return typing.get_args(hint), none_allowed, repeatable


def choice_problems(config: Any) -> list[str]:
    """One problem for each field of the dataclass ``config`` whose value is not among its ``Literal`` choices."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in dataclasses.fields(config):
        found = literal_choices(hints[f.name])
        if found is None:
            continue
        choices, none_allowed, repeatable = found
        value = getattr(config, f.name)
        values = list(value) if repeatable and isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in choices and not (v is None and none_allowed)]
        if bad:
            name = f.name.replace("_", "-")
            got = ", ".join(repr(v) for v in bad)
            problems.append(f"{name} must be one of {', '.join(map(str, choices))} (got {got})")
    return problems


def config_from(cls: type[C], config: C | None, fields: dict[str, Any]) -> C:
    """``config`` itself, or a ``cls`` built from ``fields`` (the Python API takes one or the other)."""
    if config is not None and fields:
        raise TypeError(f"pass a {cls.__name__} or its fields as keywords, not both")
    if config is None:
        return cls(**fields)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return config
