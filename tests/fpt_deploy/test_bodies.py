"""The paper's other body starts: random at every size, and a frozen random LSTM with layer norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpt_deploy.backbones import list_backbones, load_backbone
from fpt_deploy.backbones.hf import GPT2_LARGE_CONFIG, GPT2_MEDIUM_CONFIG
from fpt_deploy.errors import ConfigError
from fpt_deploy.model import FPT
from fpt_deploy.tasks import get_task


def test_random_bodies_at_every_size_are_registered():
    names = {b.name for b in list_backbones()}
    assert {"random-minilm", "random-gpt2", "random-gpt2-medium", "random-gpt2-large", "random-lstm"} <= names
    transformers = pytest.importorskip("transformers")
    # the published GPT-2 medium/large shapes (GPT2Config's defaults are small's)
    for config, params in ((GPT2_MEDIUM_CONFIG, 354.8e6), (GPT2_LARGE_CONFIG, 774.0e6)):
        cfg = transformers.GPT2Config(**config)
        d, n = cfg.n_embd, cfg.n_layer
        total = n * (12 * d * d + 13 * d) + cfg.vocab_size * d + cfg.n_positions * d + 2 * d
        assert abs(total - params) / params < 0.01


def test_lstm_width_is_in_the_name_and_init_is_seeded():
    body = load_backbone("random-lstm-48")
    assert body.hidden_size == 48 and body.num_norms == 27 and len(body.layers) == 3
    from fpt_deploy.backbones.lstm import random_lstm

    assert random_lstm(48).fingerprint() == body.fingerprint() != random_lstm(48, seed=1).fingerprint()
    assert load_backbone("random-lstm-48@seed1").fingerprint() == random_lstm(48, seed=1).fingerprint()


def test_lstm_norms_are_per_row_and_padding_never_reaches_real_tokens():
    body = load_backbone("random-lstm-16")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    w, b = torch.randn(2, 27, 16, generator=g), torch.randn(2, 27, 16, generator=g)
    out = body(hidden, mask, w, b)
    alone = body(hidden[:1, :4], mask[:1, :4], w[:1], b[:1])
    torch.testing.assert_close(out[:1, :4], alone)  # row 0's real tokens: as if no padding followed
    torch.testing.assert_close(body(hidden[1:], mask[1:], w[1:], b[1:]), out[1:])  # row 1 its own norms
    with pytest.raises(ConfigError, match="no attention"):
        body.attention_maps(hidden, mask, w, b)


def test_lstm_trains_evaluates_and_exports(tmp_path):
    from fpt_deploy.export import ExportConfig, export_task
    from fpt_deploy.training import TrainConfig, evaluate_checkpoint, train
    from fpt_deploy.training.config import EvaluateConfig

    options = {"train_size": 48, "test_size": 16}
    result = train(
        TrainConfig(
            task="bit-xor", backbone="random-lstm-16", steps=2, batch_size=16, out=tmp_path, task_options=options
        )
    )
    assert result.trainable_params < result.total_params and result.test_accuracy is not None
    scored = evaluate_checkpoint(EvaluateConfig(checkpoint=result.checkpoint))
    assert scored["split"] == "test" and scored["examples"] == 16
    exported = export_task(ExportConfig(tasks=["bit-xor"], checkpoints=[result.checkpoint], repo=tmp_path / "deploy"))
    assert exported.tasks["bit-xor"].max_abs_diff < 1e-4


def test_lstm_model_reads_the_last_real_token():
    task = get_task("bit-xor", train_size=4, test_size=4)
    model = FPT(task, load_backbone("random-lstm-16")).eval()
    x = torch.from_numpy(task.load_data("test").inputs[:2])
    assert model(x).shape == (2, 5, 2) and np.isfinite(model(x).detach().numpy()).all()


def test_a_trained_body_keeps_the_norms_and_positions_it_trained(tmp_path):
    from fpt_deploy.training import TrainConfig, train

    from fpt_deploy.checkpoint import body_from_checkpoint, load_checkpoint
    from fpt_deploy.model_options import ModelOptions

    options = {"n": 10, "patch": 5, "train_size": 32, "test_size": 16}
    config = TrainConfig(
        task="bit-memory",
        backbone="tiny-gpt2",
        model=ModelOptions(train=("all",)),
        steps=2,
        batch_size=16,
        out=tmp_path,
        task_options=options,
    )
    checkpoint = train(config).checkpoint
    model, _, _ = load_checkpoint(checkpoint)
    body = body_from_checkpoint(checkpoint)
    weight, bias = body.default_norms()
    torch.testing.assert_close(weight, model.norm_weight.detach())
    torch.testing.assert_close(bias, model.norm_bias.detach())
    L = model.input_head.position.shape[0]
    torch.testing.assert_close(body.default_positions()[:L], model.input_head.position.detach())
    assert not torch.equal(weight, load_backbone("tiny-gpt2").default_norms()[0])  # not the random body's
