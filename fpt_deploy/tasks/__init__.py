"""Tasks and their registry (``fpt-deploy tasks`` lists them)."""

from fpt_deploy.tasks import bits as _bits  # noqa: F401  (each module registers its tasks)
from fpt_deploy.tasks import images as _images  # noqa: F401
from fpt_deploy.tasks import listops as _listops  # noqa: F401
from fpt_deploy.tasks.base import Task, TaskData, TaskOption, TaskSpec, parse_options
from fpt_deploy.tasks.registry import get_task, list_tasks, register_task

__all__ = [
    "Task",
    "TaskData",
    "TaskOption",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "parse_options",
    "register_task",
]
