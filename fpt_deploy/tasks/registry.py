"""Task registry: a name maps to a ``Task`` subclass (``fpt_deploy.plugins.Registry``, group ``fpt_deploy.tasks``).

Every task, built-in or not, is an entry point: fpt-deploy declares its own in pyproject.toml, and a
plug-in package declares its tasks the same way::

    [project.entry-points."fpt_deploy.tasks"]
    my-task = "my_package.tasks:MyTask"      # a Task subclass whose ``name`` is "my-task"

``register_task`` (a class decorator) registers a class in code as well, for scripts and tests.
A task that is not registered but comes with a declaration (``kind``/``file`` options, or the frozen
declaration a checkpoint stores) is built by the ``custom`` entry (``fpt_deploy.tasks.declared``).
Torch-free.
"""

from __future__ import annotations

from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import Entry, Registry

ENTRY_POINT_GROUP = "fpt_deploy.tasks"
DECLARED = "custom"  # the entry that builds a task from a declaration (fpt_deploy.tasks.declared.DeclaredTask)
_DECLARATION_KEYS = ("kind", "file", "fitted")

TaskEntry = Entry  # .name, .value (the Task subclass), .origin


def _adopt(name: str, cls: object, origin: str) -> type | None:
    from fpt_deploy.tasks.base import Task

    if not (isinstance(cls, type) and issubclass(cls, Task)) or cls.name != name:
        return None
    return cls


TASKS: Registry[type] = Registry(ENTRY_POINT_GROUP, what="task", expects="a Task subclass named {name!r}", adopt=_adopt)


def register_task(cls=None, *, origin: str | None = None):
    """Class decorator: register a ``Task`` subclass under its ``name``."""

    def wrap(cls):
        TASKS.register(cls.name, cls, origin=origin or f"registered in code ({cls.__module__})")
        return cls

    return wrap(cls) if cls is not None else wrap


def list_task_entries() -> list[Entry]:
    """Every registered task with where it came from, sorted by name."""
    return sorted(TASKS.entries(), key=lambda e: e.name)


def list_tasks() -> list[type]:
    return [e.value for e in list_task_entries()]


def is_registered(name: str) -> bool:
    return name in TASKS


def get_task(name: str, /, *, max_positions: int | None = None, **options):
    """An instance of the task ``name`` with its options set.

    ``max_positions`` (the backbone's) lets a declared task refuse, before training, more tokens than
    the backbone has positions.
    """
    declared = TASKS.get(DECLARED).value
    found = TASKS.find(name)
    declaration = any(k in options for k in _DECLARATION_KEYS)
    if found is not None and not (declaration and not issubclass(found.value, declared)):
        cls = found.value
    elif declaration:  # a declared task (its own checks refuse a name that a registered task has)
        cls = declared
        if "file" not in options:
            options.setdefault("name", name)
    elif name in TASKS.broken:
        raise UnknownNameError(f"task {name!r} is unavailable: {TASKS.broken[name]}")
    else:
        raise UnknownNameError(
            f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS.names()))}, "
            "or declare your own with --task-file FILE.toml (docs/declared-tasks.md)"
        )
    if issubclass(cls, declared):
        return cls(max_positions=max_positions, name_taken=is_registered, **options)
    return cls(**options)
