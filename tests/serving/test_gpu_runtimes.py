"""GPU runtimes against the CPU one on the exported tiny repository (run only where the hardware is)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServingModel
from fpt_deploy.serving.executor import InferenceRequest


def mixed_logits(config: RuntimeConfig, rng_seed: int = 0) -> list[np.ndarray]:
    """Logits of one batch mixing mnist and bit-xor rows through ``config``'s runtime."""
    rng = np.random.default_rng(rng_seed)
    model = ServingModel(config)
    try:
        batch = [
            InferenceRequest(model.tasks["mnist"], rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)),
            InferenceRequest(model.tasks["bit-xor"], rng.integers(0, 2, (7, 10), dtype=np.uint8)),
        ]
        return [r.logits for r in MixedBatchExecutor(model.runtime, pad_tolerance=10.0).run(batch)]
    finally:
        model.close()


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(exported_repo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu in place of onnxruntime)")
    cpu = mixed_logits(RuntimeConfig(repo=exported_repo))
    cuda = mixed_logits(RuntimeConfig(repo=exported_repo, runtime="ort-cuda"))
    for a, b in zip(cpu, cuda, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_ort(exported_repo, tmp_path):
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    build_engine(EngineConfig(repo=repo, max_batch=16, max_len=64, max_tasks=4))
    cpu = mixed_logits(RuntimeConfig(repo=repo))
    trt = mixed_logits(RuntimeConfig(repo=repo, runtime="tensorrt"))
    for a, b in zip(cpu, trt, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
