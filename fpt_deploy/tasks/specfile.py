"""Declared-task files: a TOML file holding the options of a declared task (docs/declared-tasks.md).

    name = "digits"
    kind = "image"                 # image | sequence | tokens | bits
    data = "data/digits"           # relative to this file: an .npz or a folder of class subfolders
    patch = 2                      # the kind's options (see `fpt-deploy tasks`)
    labels = ["zero", "one", ...]  # optional class names

    [recipe]                       # optional: what `train` uses where the user gives none
    lr = 3e-3
    epochs = 10
    schedule = "cosine"

Torch-free: the training settings read a file's task name from here without importing a model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fpt_deploy.errors import ConfigError

PATH_KEYS = ("data", "test_data")


def read_task_file(path: Path) -> dict:
    """The declaration in ``path`` as task options; ``data``/``test_data`` made relative to the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"task file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"task file {path} is not valid TOML ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"task file {path} cannot be read ({e})") from e
    nested = sorted(k for k, v in table.items() if isinstance(v, dict) and k != "recipe")
    if nested:
        raise ConfigError(
            f"task file {path}: unknown table(s) [{'], ['.join(nested)}]; options go at the top, "
            "the training recipe under [recipe]"
        )
    for key in PATH_KEYS:
        value = table.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            table[key] = str(path.parent / value)
    return table


def task_file_name(path: Path) -> str:
    """The ``name`` a task file declares (what its run folder and checkpoints are called)."""
    name = read_task_file(path).get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f'task file {path} declares no name; add name = "my-task"')
    return name
