"""Task registry: a name maps to a ``Task`` subclass. Adding a task is one new module."""

from __future__ import annotations

from fpt_deploy.errors import UnknownNameError

_REGISTRY: dict[str, type] = {}


def register_task(cls):
    """Class decorator: register a ``Task`` subclass under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_tasks() -> list[type]:
    return list(_REGISTRY.values())


def get_task(name: str, **options):
    """An instance of the task ``name`` with its options set."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown task {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)
