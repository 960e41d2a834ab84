"""The Python API (docs/api.md): train, evaluate, export, predict and a served model's client, on tiny-bert."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fpt_deploy

XOR = {"train_size": 64, "test_size": 32}


def test_import_fpt_deploy_is_light():
    code = "import sys, fpt_deploy; fpt_deploy.TrainConfig; fpt_deploy.export; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"torch", "onnxruntime", "fastapi", "transformers"} & set(eval(done.stdout))
    assert {"train", "export", "predict", "evaluate", "serve", "Client", "TrainConfig"} <= set(fpt_deploy.__all__)


def test_a_config_or_its_fields_not_both():
    with pytest.raises(TypeError, match="not both"):
        fpt_deploy.train(fpt_deploy.TrainConfig(task="bit-xor"), steps=1)
    with pytest.raises(TypeError, match="expected a ExportConfig"):
        fpt_deploy.export(fpt_deploy.TrainConfig(task="bit-xor"))


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """docs/api.md's walk-through: train, export, predict."""
    root = tmp_path_factory.mktemp("api")
    config = fpt_deploy.TrainConfig(
        task="bit-xor",
        backbone="tiny-bert",
        steps=3,
        batch_size=16,
        task_options=XOR,
        out=root / "run",
        progress=False,
        model=fpt_deploy.ModelOptions(dropout=0.1),
    )
    trained = fpt_deploy.train(config)
    exported = fpt_deploy.export(checkpoints=[trained.checkpoint], repo=root / "deploy", validation_rows=8)
    x = np.random.default_rng(0).integers(0, 2, size=(5, 10), dtype=np.uint8)
    np.save(root / "x.npy", x)
    predicted = fpt_deploy.predict(fpt_deploy.PredictConfig(repo=exported.repo, task="bit-xor", input=root / "x.npy"))
    return trained, exported, predicted, x


def test_train_export_predict_in_three_calls(walkthrough):
    trained, exported, predicted, x = walkthrough
    assert trained.task == "bit-xor" and trained.steps == 3 and (trained.checkpoint / "config.json").is_file()
    assert list(exported.tasks) == ["bit-xor"] and exported.tasks["bit-xor"].max_abs_diff < 1e-3
    assert predicted.rows == len(x) and predicted.labels.shape[0] == len(x)
    result = fpt_deploy.evaluate(checkpoint=trained.checkpoint, split="val")
    assert result["task"] == "bit-xor" and 0.0 <= result["accuracy"] <= 1.0


def test_the_client_infers_by_task_name(walkthrough):
    from tests.serving.live import live_server

    _, exported, predicted, x = walkthrough
    with live_server(fpt_deploy.ServeConfig(repo=exported.repo, threads=1)) as server:
        with fpt_deploy.Client(server.http_url) as client:
            assert client.ready() and client.tasks() == ["bit-xor"]
            out = client.infer("bit-xor", x.astype(np.int64))  # cast to the task's uint8 input
            assert {"logits", "probabilities"} <= set(out)
            np.testing.assert_allclose(out["logits"], predicted.logits, atol=1e-4)
            assert set(client.infer("bit-xor", x, outputs=["logits"])) == {"logits"}
            with pytest.raises(fpt_deploy.errors.ConfigError, match="takes uint8 input"):
                client.infer("bit-xor", x.astype(np.float32))
