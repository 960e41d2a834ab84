"""Task registry: a name maps to a ``Task`` subclass, found through entry points.

Every task, built-in or not, is an entry point of the group ``fpt_deploy.tasks``: fpt-deploy declares
its own in pyproject.toml, and a plug-in package declares its tasks the same way::

    [project.entry-points."fpt_deploy.tasks"]
    my-task = "my_package.tasks:MyTask"      # a Task subclass whose ``name`` is "my-task"

``register_task`` (a class decorator) registers a class in code as well, for scripts and tests.
A task that is not registered but comes with a declaration (``kind``/``file`` options, or the frozen
declaration a checkpoint stores) is a declared task (``fpt_deploy.tasks.declared``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import PluginGroup

ENTRY_POINT_GROUP = "fpt_deploy.tasks"
# Imported when fpt-deploy's own entry points are missing (a source tree used without installing it).
_BUILTIN_MODULES = ("bits", "images", "listops", "lra", "homology", "declared")
_DECLARATION_KEYS = ("kind", "file", "fitted")


@dataclass(frozen=True, kw_only=True)
class TaskEntry:
    name: str
    task: type  # a Task subclass
    origin: str  # where it came from: "fpt-deploy 0.1.0", "my-plugin 1.2 (plug-in)", "registered in code (...)"


_REGISTRY: dict[str, TaskEntry] = {}
_PLUGINS = PluginGroup(ENTRY_POINT_GROUP, what="task", expects="a Task subclass named {name!r}")


def register_task(cls=None, *, origin: str | None = None):
    """Class decorator: register a ``Task`` subclass under its ``name``."""

    def wrap(cls):
        _REGISTRY[cls.name] = TaskEntry(
            name=cls.name, task=cls, origin=origin or f"registered in code ({cls.__module__})"
        )
        return cls

    return wrap(cls) if cls is not None else wrap


def _as_entry(name: str, cls, origin: str) -> TaskEntry | None:
    from fpt_deploy.tasks.base import Task

    if not (isinstance(cls, type) and issubclass(cls, Task)) or cls.name != name:
        return None
    return TaskEntry(name=name, task=cls, origin=origin)


def _register(name: str, entry: TaskEntry) -> None:
    _REGISTRY[name] = entry


def _import_builtin_tasks() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"fpt_deploy.tasks.{module}")


def _load_entry_points() -> None:
    _PLUGINS.load_once(_as_entry, _register, _import_builtin_tasks)


def list_task_entries() -> list[TaskEntry]:
    """Every registered task with where it came from, sorted by name."""
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def list_tasks() -> list[type]:
    return [e.task for e in list_task_entries()]


def is_registered(name: str) -> bool:
    _load_entry_points()
    return name in _REGISTRY


def get_task(name: str, /, *, max_positions: int | None = None, **options):
    """An instance of the task ``name`` with its options set.

    ``max_positions`` (the backbone's) lets a declared task refuse, before training, more tokens than
    the backbone has positions.
    """
    _load_entry_points()
    from fpt_deploy.tasks.declared import DeclaredTask

    declaration = any(k in options for k in _DECLARATION_KEYS)
    if name in _REGISTRY and not (declaration and not issubclass(_REGISTRY[name].task, DeclaredTask)):
        cls = _REGISTRY[name].task
    elif declaration:  # a declared task (its own checks refuse a name that a registered task has)
        cls = DeclaredTask
        if "file" not in options:
            options.setdefault("name", name)
    elif name in _PLUGINS.broken:
        raise UnknownNameError(f"task {name!r} is unavailable: {_PLUGINS.broken[name]}")
    else:
        raise UnknownNameError(
            f"unknown task {name!r}; choose one of {', '.join(sorted(_REGISTRY))}, "
            "or declare your own with --task-file FILE.toml (docs/declared-tasks.md)"
        )
    if issubclass(cls, DeclaredTask):
        return cls(max_positions=max_positions, **options)
    return cls(**options)
