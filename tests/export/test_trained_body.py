"""A run that trained its body (``--train all``) exports that body as its own backbone, served beside FPT tasks."""

from __future__ import annotations

import numpy as np
import pytest

from fpt_deploy.artifacts import open_repository
from fpt_deploy.backbones import load_backbone
from fpt_deploy.errors import ExportUnsupportedError
from fpt_deploy.model_options import ModelOptions


def _train(out, task, **kw):
    from fpt_deploy.training import TrainConfig, train

    config = TrainConfig(task=task, backbone="tiny-bert", steps=3, batch_size=16, out=out, progress=False, **kw)
    return train(config).checkpoint


def test_train_all_checkpoint_serves_next_to_an_fpt_task_from_one_repository(tmp_path):
    from fpt_deploy.export import ExportConfig, export_task
    from fpt_deploy.serving.config import PredictConfig
    from fpt_deploy.serving.predict import predict

    fpt = _train(tmp_path / "mnist", "mnist")
    full = _train(
        tmp_path / "xor",
        "bit-xor",
        model=ModelOptions(train=("all",)),
        task_options={"train_size": 64, "test_size": 32},
    )
    repo = tmp_path / "deploy"
    export_task(ExportConfig(tasks=["mnist", "bit-xor"], checkpoints=[fpt, full], repo=repo))

    manifest = open_repository(repo)
    base = load_backbone("tiny-bert").fingerprint()
    assert manifest.tasks["mnist"].fingerprint == base
    trained = manifest.tasks["bit-xor"].fingerprint
    assert trained != base and set(manifest.backbones) == {base, trained}

    xor = np.random.default_rng(0).integers(0, 2, size=(4, 10), dtype=np.uint8)
    np.save(tmp_path / "xor.npy", xor)
    served = predict(PredictConfig(repo=repo, task="bit-xor", input=tmp_path / "xor.npy", fingerprint=trained[:12]))
    assert served.labels.shape == (4, 5)
    # the served labels are the trained body's, not the base body's
    from fpt_deploy.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(full)
    import torch

    expected = model.eval()(torch.from_numpy(xor)).argmax(-1).numpy()
    np.testing.assert_array_equal(served.labels, expected)
    mnist = np.zeros((1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "mnist.npy", mnist)
    assert (
        predict(PredictConfig(repo=repo, task="mnist", input=tmp_path / "mnist.npy", fingerprint=base[:12])).rows == 1
    )


def test_hidden_head_layers_are_refused_by_export_with_the_reason(tmp_path):
    from fpt_deploy.export import ExportConfig, export_task

    ck = _train(
        tmp_path / "xor",
        "bit-xor",
        model=ModelOptions(output_hidden_layers=1),
        task_options={"train_size": 32, "test_size": 16},
    )
    with pytest.raises(ExportUnsupportedError, match="hidden layers"):
        export_task(ExportConfig(tasks=["bit-xor"], checkpoints=[ck], repo=tmp_path / "deploy"))
