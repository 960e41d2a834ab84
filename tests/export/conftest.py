"""Export fixtures: private copies of the shared exported repository (tests/conftest.py), more checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def _train(out: Path, task: str, backbone: str, **options) -> Path:
    from fpt_deploy.training import TrainConfig, train

    train(
        TrainConfig(task=task, backbone=backbone, steps=2, batch_size=16, out=out, task_options=options, progress=False)
    )
    return out / "best"


@pytest.fixture
def repo_copy(exported, tmp_path) -> Path:
    """A private copy of the exported repository (file times preserved)."""
    return Path(shutil.copytree(exported.repo, tmp_path / "repo"))


@pytest.fixture(scope="session")
def tiny_gpt2_checkpoint(tmp_path_factory) -> Path:
    """bit-xor on tiny-gpt2: a task whose backbone is not in the ``exported`` repository."""
    return _train(tmp_path_factory.mktemp("gpt2") / "bit-xor", "bit-xor", "tiny-gpt2", train_size=64, test_size=32)


@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory) -> Path:
    """mnist on the real MiniLM body after a step or two (for size and speed checks, not accuracy)."""
    return _train(tmp_path_factory.mktemp("minilm") / "mnist", "mnist", "minilm", test_fraction=0.05)  # 250 scored
