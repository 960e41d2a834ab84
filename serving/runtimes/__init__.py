"""Backbone runtimes as plug-ins: one module per runtime, one registry by name.

Adding a runtime (docs/architecture.md, "Where each kind of change goes") is one new module with a
``Runtime`` subclass and one line in ``_BUILT_IN`` below (``"name": "module:Class"``); ``--runtime``
lists whatever ``runtime_names()`` returns. A runtime from another package registers with the
``register_runtime`` decorator or an entry point in the ``fpt_deploy.runtimes`` group (same
``"module:Class"`` form). Modules load only when their runtime is created, so importing this package
never imports CUDA or TensorRT.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime, check_norm_tables

from fpt_deploy.errors import UnknownNameError

ENTRY_POINT_GROUP = "fpt_deploy.runtimes"

_BUILT_IN: dict[str, str] = {
    "ort": "fpt_deploy.serving.runtimes.ort:OrtRuntime",
    "ort-cuda": "fpt_deploy.serving.runtimes.ort_cuda:OrtCudaRuntime",
    "tensorrt": "fpt_deploy.serving.runtimes.tensorrt.runtime:TensorRTRuntime",
    "torch": "fpt_deploy.serving.runtimes.torch_runtime:TorchRuntime",
}
_registry: dict[str, str | type[Runtime]] = dict(_BUILT_IN)
_entry_points_read = False


def _read_entry_points() -> None:
    global _entry_points_read
    if not _entry_points_read:
        _entry_points_read = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _registry.setdefault(ep.name, ep.value)


def register_runtime(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Class decorator: serve ``--runtime name`` with this ``Runtime`` subclass (sets its ``name``)."""

    def register(cls: type[Runtime]) -> type[Runtime]:
        if not (isinstance(cls, type) and issubclass(cls, Runtime)):
            raise TypeError(f"runtime {name!r} must be a Runtime subclass, got {cls!r}")
        cls.name = name
        _registry[name] = cls
        return cls

    return register


def runtime_names() -> list[str]:
    """Every runtime ``--runtime`` accepts, built-in ones first; whether it runs here is checked at load."""
    _read_entry_points()
    return list(_registry)


def runtime_class(name: str) -> type[Runtime]:
    """The ``Runtime`` subclass registered as ``name`` (its module is imported now)."""
    _read_entry_points()
    if name not in _registry:
        raise UnknownNameError(f"unknown runtime {name!r}; runtimes: {', '.join(_registry)}")
    target = _registry[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        cls.name = name
        _registry[name] = target = cls
    return target


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
    "Runtime",
    "check_norm_tables",
    "create_runtime",
    "register_runtime",
    "runtime_class",
    "runtime_names",
]
