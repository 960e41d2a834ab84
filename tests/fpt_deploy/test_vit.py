"""A body from another modality end to end: `fpt-deploy train --backbone tiny-vit`, export, serve, one request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fpt_deploy.tasks import get_task


@pytest.mark.slow  # an export: minutes on 2 shared cores
def test_vit_body_trains_exports_and_serves_one_request(tmp_path):
    from fastapi.testclient import TestClient
    from fpt_deploy.serving import ServeConfig
    from fpt_deploy.serving.server import ServerState, create_app

    from fpt_deploy.cli import app

    run, repo = tmp_path / "run", tmp_path / "deploy"
    train = ["train", "--task", "mnist", "--backbone", "tiny-vit", "--steps", "2", "--batch-size", "8"]
    r = CliRunner().invoke(app, [*train, "--out", str(run)])
    assert r.exit_code == 0, r.output
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["backbone"] == "tiny-vit"
    r = CliRunner().invoke(app, ["export", "--task", "mnist", "--checkpoint", str(run / "best"), "--repo", str(repo)])
    assert r.exit_code == 0, r.output

    image = get_task("mnist").load_data("test").inputs[:1]  # (1, 28, 28) uint8
    request = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": image.ravel().tolist()}]}
    state = ServerState.load(ServeConfig(repo=repo))
    with TestClient(create_app(state)) as client:
        answer = client.post("/v2/models/mnist/infer", content=json.dumps(request).encode())
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probabilities.shape == (1, 10)
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-4)
