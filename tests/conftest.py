"""Shared fixtures: tiny random backbones keep the suite fast."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_configure(config):
    """Each pytest-xdist worker takes its share of the cores. torch's default, a thread per core in every
    worker, oversubscribes the machine (2 workers x 2 threads on 2 cores) and slows every test down."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or not HAS_TORCH:
        return
    share = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))  # the children (servers, torchrun ranks) too
    import torch

    torch.set_num_threads(share)


def pytest_collection_modifyitems(config, items):
    """Marked tests skip with a message where their hardware or package is missing (never silently pass)."""
    has_cuda = False
    if HAS_TORCH:
        import torch

        has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        # Markers, not keywords: keywords also hold the names of parent nodes (a checkout folder named "gpu").
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine"))
        if item.get_closest_marker("tensorrt") and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU"))


def train_tiny(out: Path, task: str = "bit-xor", backbone: str = "tiny-bert", steps: int = 4, **options) -> Path:
    """Train ``task`` for a few steps on a tiny random backbone; returns the best-checkpoint folder."""
    from fpt_deploy.training import TrainConfig, train

    small = {"train_size": 64, "test_size": 32} if task in ("bit-xor", "bit-memory", "listops") else {}
    if task == "bit-memory":
        small |= {"n": 20, "patch": 5}
    if task == "listops":
        small |= {"max_len": 48, "min_len": 4, "max_depth": 3}
    config = TrainConfig(
        task=task,
        backbone=backbone,
        steps=steps,
        batch_size=16,
        out=out,
        task_options={**small, **options},
        progress=False,
    )
    train(config)
    return out / "best"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of mnist and bit-xor on tiny-bert, trained a few steps (shared by export/serving tests)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {task: train_tiny(root / task, task) for task in ("mnist", "bit-xor")}


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, tmp_path_factory):
    """mnist and bit-xor (tiny-bert) exported into one repository, shared by the export and serving tests.
    Tests must not modify it: copy it."""
    from fpt_deploy.export import ExportConfig, export_task

    config = ExportConfig(
        checkpoints=[tiny_checkpoints["mnist"], tiny_checkpoints["bit-xor"]],
        repo=tmp_path_factory.mktemp("deploy") / "repo",
        validation_rows=16,
    )
    return export_task(config)


@pytest.fixture(scope="session")
def exported_repo(exported, tmp_path_factory) -> Path:
    """A copy of the ``exported`` repository for the serving tests: serving writes its runtime's cache beside
    the backbone, which the export tests must not see."""
    return Path(shutil.copytree(exported.repo, tmp_path_factory.mktemp("served") / "repo"))


@pytest.fixture(scope="session")
def paper_trainable() -> frozenset[str]:
    """Exactly what trains (docs/architecture.md, "The pipeline"): input layer, positions, every norm's scale and bias,
    output layer. For a Linear input layer; an Embedding (token tasks) has no ``input_head.embed.bias``."""
    return frozenset(
        {
            "input_head.embed.weight",
            "input_head.embed.bias",
            "input_head.position",
            "norm_weight",
            "norm_bias",
            "output_head.linear.weight",
            "output_head.linear.bias",
        }
    )
