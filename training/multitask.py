"""Several tasks as one job against ONE frozen body: how a user adds twenty tasks without twenty jobs.

    fpt-deploy train --tasks bit-xor,bit-memory,mnist -o bit-memory:n=100 -o bit-memory:patch=10 --out runs/job

The body is loaded once (``load_backbone`` caches it per process) and every task's ``FPT`` holds that
same instance; each task owns its heads, norm parameters, Adam state, data order and run folder
(``OUT/<task>/best`` and ``OUT/<task>/last``, each exactly what single-task training writes). The job
takes one optimizer step of each unfinished task in turn (round-robin). Because the body is frozen and
in eval mode, tasks do not interact: each task's tensors follow the same trajectory as training it alone
with the same settings, while the process holds one body and one PyTorch runtime instead of one per task.
Under ``torchrun`` every task's step is data-parallel, as in single-task training.

Task options: ``-o TASK:KEY=VALUE`` sets an option of one task; ``-o KEY=VALUE`` sets it for every
task of the job (each must have that option).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fpt_deploy.training.config import TrainConfig
from fpt_deploy.training.loop import TrainResult, run_job

from fpt_deploy.errors import collect
from fpt_deploy.tasks import parse_options

# Settings the job shares: the one body, where it runs, and how the ranks meet.
SHARED_SETTINGS = ("backbone", "device", "bf16", "dist_backend", "progress")


def parse_task_list(tasks: str) -> list[str]:
    """``"mnist, bit-xor"`` -> ``["mnist", "bit-xor"]``; each task at most once."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    duplicates = sorted({t for t in names if names.count(t) > 1})
    problems = ["--tasks names no task"] if not names else []
    if duplicates:
        problems.append(
            f"--tasks names {', '.join(duplicates)} more than once; each task trains once a job "
            "(its checkpoints go to OUT/<task>)"
        )
    collect(problems)
    return names


def split_task_options(tasks: list[str], pairs: list[str]) -> dict[str, dict]:
    """``-o`` values per task: ``TASK:KEY=VALUE`` for one task, ``KEY=VALUE`` for all of ``tasks``."""
    per_task: dict[str, list[str]] = {t: [] for t in tasks}
    problems = []
    for pair in pairs:
        key = pair.split("=", 1)[0]
        if ":" in key:
            name, rest = pair.split(":", 1)
            name = name.strip()
            if name in per_task:
                per_task[name].append(rest)
            else:
                problems.append(f"option {pair!r} names task {name!r}, which is not among {', '.join(tasks)}")
        else:
            for options in per_task.values():
                options.append(pair)
    collect(problems)
    return {t: parse_options(options) for t, options in per_task.items()}


def multitask_configs(
    settings: TrainConfig, tasks: list[str], options: list[str], out: Path | None = None, per_task_folders: bool = True
) -> list[TrainConfig]:
    """One config per task: ``settings`` with the task and its options (``-o`` values, see module doc).

    Run folders: ``OUT/<task>`` (default ``runs/<task>``); with ``per_task_folders=False`` (the plain
    ``--task`` command, one task) the folder of ``settings`` stays as it is.
    """
    root = Path(out) if out else Path("runs")
    per_task = split_task_options(tasks, options)
    if not per_task_folders and len(tasks) == 1:
        return [dataclasses.replace(settings, task=tasks[0], task_options=per_task[tasks[0]])]
    return [dataclasses.replace(settings, task=t, task_options=per_task[t], out=root / t) for t in tasks]


def train_multitask(configs: list[TrainConfig]) -> list[TrainResult]:
    """Train each config's task in one job against one shared frozen body; one result per task, in order."""
    problems = [] if configs else ["no task to train"]
    for name in SHARED_SETTINGS:
        values = {repr(getattr(c, name)) for c in configs}
        if len(values) > 1:
            problems.append(f"the tasks of one job share one {name} (got {', '.join(sorted(values))})")
    outs = [c.out.resolve() for c in configs]
    if len(set(outs)) < len(outs):
        problems.append("two tasks of the job would write the same run folder; give each task its own out")
    collect(problems)
    return run_job(configs)
