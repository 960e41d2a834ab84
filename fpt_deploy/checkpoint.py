"""Checkpoints: the trainable tensors (safetensors) plus a JSON config that rebuilds the model.

Layout of a checkpoint folder::

    config.json          format, task name + options + spec, backbone name + fingerprint, metrics
    trainable.safetensors  exactly FPT.trainable_state()
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fpt_deploy.atomic import replace_dir
from fpt_deploy.errors import CheckpointError, FingerprintMismatchError

log = logging.getLogger(__name__)

FORMAT = "fpt-deploy-checkpoint/1"
CONFIG_FILE, TENSORS_FILE, TRAINER_STATE_FILE = "config.json", "trainable.safetensors", "trainer_state.pt"


def save_checkpoint(
    path: str | Path, model, task, backbone: str, metrics: dict, extra: dict | None = None, trainer_state=None
) -> None:
    """Write ``model``'s trainable tensors and what rebuilds it to the folder ``path``, atomically.

    ``trainer_state`` (optimizer state, step, RNG), when given, goes beside them for ``--resume``.
    """
    from safetensors.torch import save_file

    config = {
        "format": FORMAT,
        "task": task.name,
        "task_options": task.options,
        "spec": task.spec.to_json(),
        "backbone": backbone,
        "fingerprint": model.body.fingerprint(),
        "metrics": metrics,
        **(extra or {}),
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state().items()}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / TENSORS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if trainer_state is not None:
            import torch

            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)

    replace_dir(path, fill)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a training run folder (then its ``best`` checkpoint)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "best" / CONFIG_FILE).is_file():
        path = path / "best"
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {CONFIG_FILE}); pass the folder that training wrote")
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is corrupt ({e}); retrain or restore the checkpoint") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an fpt-deploy checkpoint (format {config.get('format')!r})"
            if isinstance(config, dict)
            else f"{path / CONFIG_FILE} is not a JSON object"
        )
    return config


def load_checkpoint(path: str | Path, backbone: str | None = None, device: str = "cpu"):
    """Rebuild the model a checkpoint describes, on ``device``; returns ``(model, task, config)``.

    ``backbone`` overrides where the body comes from (a local folder, say); its fingerprint must match.
    Bodies are shared per process (``load_backbone`` caches them), so the body moves to ``device`` too.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fpt_deploy.backbones import load_backbone
    from fpt_deploy.model import FPT
    from fpt_deploy.tasks import get_task

    path = resolve_checkpoint(path)
    config = read_checkpoint_config(path)
    task = get_task(config["task"], **config["task_options"])
    body = load_backbone(backbone or config["backbone"])
    if body.fingerprint() != config["fingerprint"]:
        raise FingerprintMismatchError(
            f"checkpoint {path} was trained on a body with fingerprint {config['fingerprint'][:16]}, but backbone "
            f"{backbone or config['backbone']!r} has {body.fingerprint()[:16]}; pass the backbone it was trained on"
        )
    model = FPT(task, body)
    try:
        state = load_file(str(path / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / TENSORS_FILE} is missing or corrupt ({e}); retrain or restore it") from e
    expected = model.trainable_state()
    problems = sorted(set(expected) ^ set(state))
    problems += [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if problems:
        raise CheckpointError(
            f"{path} does not fit task {task.name!r} (tensors {', '.join(problems)}): "
            "it was written for another task or version"
        )
    model.load_state_dict(state, strict=False)
    return model.to(device), task, config
