"""Checkpoints: the trainable tensors (safetensors) plus a JSON config that rebuilds the model.

Layout of a checkpoint folder::

    config.json          format, task name + options + spec, backbone name + fingerprint, metrics,
                         the model options (``"model"``: trained groups, head layers, dropout)
    trainable.safetensors  exactly FPT.trainable_state(): the task's tensors, plus the body's when it trained

A run that trained body weights (``--train all``) records the fingerprint of the body it ended with
(``fingerprint``) and of the body it started from (``base_fingerprint``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fpt_deploy.atomic import replace_dir
from fpt_deploy.backbones.registry import BackboneEntry
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
        "model": model.options.to_json(),
        **({"base_fingerprint": model.base_fingerprint} if model.options.trains_body else {}),
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
    from fpt_deploy.model_options import ModelOptions
    from fpt_deploy.tasks import get_task

    path = resolve_checkpoint(path)
    config = read_checkpoint_config(path)
    task = get_task(config["task"], **config["task_options"])
    options = ModelOptions.from_json(config.get("model"))
    body = load_backbone(backbone or config["backbone"])
    started_from = config.get("base_fingerprint", config["fingerprint"])
    if body.fingerprint() != started_from:
        raise FingerprintMismatchError(
            f"checkpoint {path} was trained on a body with fingerprint {started_from[:16]}, but backbone "
            f"{backbone or config['backbone']!r} has {body.fingerprint()[:16]}; pass the backbone it was trained on"
        )
    model = FPT(task, body, options)
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
    if options.trains_body:
        model.body.freeze()  # trained, now fixed: its fingerprint is the one the checkpoint recorded
        if model.body.fingerprint() != config["fingerprint"]:
            raise CheckpointError(f"{path}: the trained body's tensors do not hash to the recorded fingerprint")
    return model.to(device), task, config


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder, or a run folder with a ``best`` checkpoint."""
    path = Path(path)
    return any((p / CONFIG_FILE).is_file() and (p / TENSORS_FILE).is_file() for p in (path, path / "best"))


def body_from_checkpoint(path: str | Path):
    """The body a checkpoint ended with, frozen: a ``--train all`` run's (the paper's Bit-Memory-pretrained
    body, section 3.3) serves as the backbone of later runs (``--backbone runs/<run>/best``)."""
    model, task, config = load_checkpoint(path)
    if not model.options.trains_body:
        log.info("%s trained no body weights; its body is backbone %s unchanged", path, config["backbone"])
        return model.body.freeze()
    import torch

    body = model.body
    with torch.no_grad():  # later tasks start from the norms and positions this run trained, as the reference
        body.pretrained_norm_weight.copy_(model.norm_weight)
        body.pretrained_norm_bias.copy_(model.norm_bias)
        trained = model.input_head.position[: body.max_positions]
        body.pretrained_positions[: len(trained)] = trained
    body.__dict__.pop("_fingerprint", None)
    return body.freeze()


CHECKPOINT_BODY = BackboneEntry(
    name="checkpoint",
    description="the body a checkpoint ended with (--backbone runs/<run>/best after --train all)",
    source="a checkpoint folder",
    loader=body_from_checkpoint,
    matches=is_checkpoint,
)
