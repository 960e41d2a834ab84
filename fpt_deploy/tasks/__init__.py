"""Tasks and their registry (``fpt-deploy tasks`` lists them).

Every task is registered through the ``fpt_deploy.tasks`` entry points, the built-in ones included
(pyproject.toml); ``fpt_deploy.tasks.registry`` loads them on first use.
"""

from fpt_deploy.tasks.base import Task, TaskData, TaskOption, TaskSpec, parse_options
from fpt_deploy.tasks.recipe import Recipe
from fpt_deploy.tasks.registry import get_task, list_task_entries, list_tasks, register_task

__all__ = [
    "Task",
    "TaskData",
    "TaskOption",
    "TaskSpec",
    "Recipe",
    "get_task",
    "list_task_entries",
    "list_tasks",
    "parse_options",
    "register_task",
]
