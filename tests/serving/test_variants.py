"""Backbone variants: the int8 backbone serves the same heads; a missing variant is a clear error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServingModel
from fpt_deploy.serving.executor import InferenceRequest

from fpt_deploy.errors import ArtifactError


def mixed_probabilities(config: RuntimeConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    model = ServingModel(config)
    try:
        batch = [
            InferenceRequest(model.tasks["mnist"], rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
            InferenceRequest(model.tasks["bit-xor"], rng.integers(0, 2, (6, 10), dtype=np.uint8)),
        ]
        return [r.probabilities for r in MixedBatchExecutor(model.runtime).run(batch)]
    finally:
        model.close()


def test_int8_backbone_serves_the_same_heads(exported_repo, tiny_checkpoints, tmp_path):
    from fpt_deploy.export import ExportConfig, export_task

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    export_task(
        ExportConfig(
            checkpoints=[tiny_checkpoints["mnist"], tiny_checkpoints["bit-xor"]],
            repo=repo,
            validation_rows=16,
            quantize="int8",
            force=True,
        )
    )
    fp32 = mixed_probabilities(RuntimeConfig(repo=repo, threads=1))
    int8 = mixed_probabilities(RuntimeConfig(repo=repo, threads=1, backbone_variant="int8"))
    for a, b in zip(fp32, int8, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=0.1)  # quantized, yet the same model
        assert not np.array_equal(a, b)  # and really another backbone file


def test_missing_variant_names_what_exists(exported_repo):
    with pytest.raises(ArtifactError, match="has no 'int8' variant \\(has fp32\\); export it first"):
        ServingModel(RuntimeConfig(repo=exported_repo, backbone_variant="int8"))
