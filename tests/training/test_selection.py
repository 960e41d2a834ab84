"""Honest selection: a seeded validation split from the training data chooses; the test split is only reported."""

from __future__ import annotations

import json

import torch
from fpt_deploy.training import TrainConfig, evaluate_checkpoint, train
from fpt_deploy.training.config import EvaluateConfig
from fpt_deploy.training.loop import carve_validation

OPTIONS = {"train_size": 80, "test_size": 24}


def test_validation_is_a_seeded_disjoint_share_of_the_training_data():
    x = torch.arange(100)[:, None]
    (xt, _), (xv, _) = carve_validation(x, x[:, 0], 0.2, seed=1)
    assert len(xv) == 20 and len(xt) == 80 and not set(xt[:, 0].tolist()) & set(xv[:, 0].tolist())
    assert torch.equal(carve_validation(x, x[:, 0], 0.2, seed=1)[1][0], xv)
    assert not torch.equal(carve_validation(x, x[:, 0], 0.2, seed=2)[1][0], xv)
    assert len(carve_validation(x, x[:, 0], 0.0, seed=1)[1][0]) == 0


def test_best_checkpoint_is_chosen_on_validation_and_reports_test(tmp_path):
    result = train(
        TrainConfig(
            task="bit-xor",
            backbone="tiny-bert",
            steps=4,
            eval_every=1,
            batch_size=16,
            out=tmp_path,
            val_fraction=0.25,
            task_options=OPTIONS,
            progress=False,
        )
    )
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["splits"] == {"train": 60, "val": 20, "test": 24}
    history = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=False)["history"]
    best = max(history, key=lambda h: h["val_accuracy"])  # the first of equals, as training keeps it
    assert result.best_accuracy == best["val_accuracy"] == config["metrics"]["val_accuracy"]
    assert result.test_accuracy == best["test_accuracy"] == config["metrics"]["test_accuracy"]
    assert config["metrics"]["chosen_on"] == "val"
    on_val = evaluate_checkpoint(EvaluateConfig(checkpoint=result.checkpoint, split="val"))
    assert on_val["split"] == "val" and on_val["examples"] == 20
    assert abs(on_val["accuracy"] - result.best_accuracy) < 1e-6
    on_test = evaluate_checkpoint(EvaluateConfig(checkpoint=result.checkpoint))
    assert on_test["split"] == "test" and abs(on_test["accuracy"] - result.test_accuracy) < 1e-6
