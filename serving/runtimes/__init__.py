"""Backbone runtimes as plug-ins: one module per runtime, one registry by name.

Adding a runtime (docs/architecture.md, "Where each kind of change goes") is one new module with a
``Runtime`` subclass and one entry point in the group ``fpt_deploy.runtimes`` (pyproject.toml,
``name = "module:Class"``); a runtime from another package declares its own the same way, or registers
in code with the ``register_runtime`` decorator. ``--runtime`` lists whatever ``runtime_names()``
returns. Modules load only when their runtime is asked for (``fpt_deploy.plugins.Registry``), so
importing this package never imports CUDA or TensorRT, and a runtime whose module fails to import is
reported as unavailable, with why, without taking the others down.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime, check_norm_tables

from fpt_deploy.plugins import Registry

ENTRY_POINT_GROUP = "fpt_deploy.runtimes"


def _adopt(name: str, cls: object, origin: str) -> type[Runtime] | None:
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        return None
    cls.name = name
    return cls


RUNTIMES: Registry[type[Runtime]] = Registry(
    ENTRY_POINT_GROUP, what="runtime", expects="a Runtime subclass", adopt=_adopt
)


def register_runtime(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Class decorator: serve ``--runtime name`` with this ``Runtime`` subclass (sets its ``name``)."""

    def register(cls: type[Runtime]) -> type[Runtime]:
        return RUNTIMES.register(name, cls, origin=f"registered in code ({getattr(cls, '__module__', '?')})")

    return register


def runtime_names() -> list[str]:
    """Every runtime ``--runtime`` accepts, built-in ones first; whether it runs here is checked at load."""
    return RUNTIMES.names()


def runtime_class(name: str) -> type[Runtime]:
    """The ``Runtime`` subclass registered as ``name`` (its module is imported now)."""
    return RUNTIMES.get(name).value


def create_runtime(
    name: str,
    backbone_file: Path,
    norm_weight: np.ndarray,
    norm_bias: np.ndarray,
    *,
    threads: int | None = None,
    **options,
) -> Runtime:
    """The runtime ``name`` executing ``backbone_file`` over the norm tables (T, N_norm, D).

    ``backbone_file`` is what ``runtime_class(name).backbone_file(...)`` chose (or a file the user
    named); ``threads`` is the host threads a CPU runtime may use (None: its default); ``options`` are
    the runtime's own keyword arguments (the torch runtime's ``device``, ``precision``, ...).
    """
    return runtime_class(name)(Path(backbone_file), norm_weight, norm_bias, threads=threads, **options)


__all__ = [
    "ENTRY_POINT_GROUP",
    "RUNTIMES",
    "Runtime",
    "check_norm_tables",
    "create_runtime",
    "register_runtime",
    "runtime_class",
    "runtime_names",
]
