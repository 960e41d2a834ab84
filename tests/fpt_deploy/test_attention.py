"""``fpt-deploy attention``: a checkpoint's attention maps, one panel per layer and head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fpt_deploy.attention import AttentionConfig, draw_attention
from fpt_deploy.backbones import load_backbone
from fpt_deploy.checkpoint import save_checkpoint
from fpt_deploy.errors import ConfigError
from fpt_deploy.model import FPT
from fpt_deploy.tasks import get_task

XOR = {"train_size": 16, "test_size": 8}


@pytest.fixture
def xor_checkpoint(tmp_path):
    task = get_task("bit-xor", **XOR)
    model = FPT(task, load_backbone("tiny-bert"))
    save_checkpoint(tmp_path / "ck", model, task, "tiny-bert", {})
    return tmp_path / "ck", model, task


def test_cli_writes_a_grid_for_the_given_input(xor_checkpoint, tmp_path):
    from fpt_deploy.cli import app

    path, model, task = xor_checkpoint
    x = task.load_data("test").inputs[:2]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "maps" / "attention.png"
    r = CliRunner().invoke(
        app, ["attention", "--checkpoint", str(path), "--input", str(tmp_path / "x.npy"), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "2 layers x 4 heads" in r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maps_are_the_models_own_probabilities(xor_checkpoint, tmp_path):
    path, model, task = xor_checkpoint
    result = draw_attention(AttentionConfig(checkpoint=path, out=tmp_path / "a.png", examples=3))
    assert result.maps.shape == (3, 2, 4, 10, 10)
    np.testing.assert_allclose(result.maps.sum(-1), 1.0, rtol=1e-5)
    x = torch.from_numpy(task.load_data("test").inputs[:3])
    hidden, mask = model.eval().input_head(x)
    w, b = model.norm_weight.expand(3, -1, -1), model.norm_bias.expand(3, -1, -1)
    expected = model.body.attention_maps(hidden, mask, w, b)[1].numpy()
    np.testing.assert_allclose(result.maps[:, 1], expected, atol=1e-6)


def test_config_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        AttentionConfig(checkpoint=tmp_path, out=tmp_path / "a.jpg", examples=0, input=tmp_path / "x.csv")
    assert "examples" in str(e.value) and ".png" in str(e.value) and ".npy" in str(e.value)
