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


def _fake_onnxruntime(tmp_path, provider_bytes: bytes | None):
    """A stand-in ``onnxruntime`` module whose package folder holds ``provider_bytes`` as the CUDA provider."""
    import types

    folder = tmp_path / "onnxruntime"
    (folder / "capi").mkdir(parents=True)
    if provider_bytes is not None:
        (folder / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(provider_bytes)
    module = types.ModuleType("onnxruntime")
    module.__file__ = str(folder / "__init__.py")
    module.__version__ = "1.31.1"
    module.preloaded = []
    module.preload_dlls = lambda: module.preloaded.append(True)
    return module


def test_ort_cuda_preloads_the_wheels_and_names_what_the_loader_missed(tmp_path):
    from fpt_deploy.serving.runtimes.ort_cuda import missing_cuda_library, preload_cuda_libraries

    broken = _fake_onnxruntime(tmp_path, b"not a shared library")
    preload_cuda_libraries(broken)
    assert broken.preloaded == [True]  # onnxruntime.preload_dlls() ran before any session
    why = missing_cuda_library(broken)
    assert "libonnxruntime_providers_cuda.so" in why  # the loader's own words, naming the file it could not load
    cpu_build = _fake_onnxruntime(tmp_path / "cpu", None)
    assert "not the onnxruntime-gpu build" in missing_cuda_library(cpu_build)
    del cpu_build.preload_dlls  # an onnxruntime older than 1.21: nothing to preload, no error
    preload_cuda_libraries(cpu_build)


def test_without_onnxruntime_serving_says_which_extra_to_install(synthetic_repo):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from fpt_deploy.serving import RuntimeConfig, ServingModel\n"
        "from fpt_deploy.errors import RuntimeUnavailableError\n"
        "try:\n"
        f"    ServingModel(RuntimeConfig(repo={str(synthetic_repo)!r}))\n"
        "except RuntimeUnavailableError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'fpt-deploy[cpu]'" in done.stdout and "'fpt-deploy[gpu]'" in done.stdout, done.stderr


def test_the_ort_runtime_starts_where_onnxruntime_gpu_provides_the_module(exported_repo, tmp_path, monkeypatch):
    """onnxruntime-gpu (the [gpu] extra) installs the ``onnxruntime`` module with no ``onnxruntime``
    distribution metadata: nothing on the serving path may look the module up by that name."""
    import importlib.metadata

    real_from_name = importlib.metadata.Distribution.from_name

    def gpu_build_only(name):
        if name.lower().replace("_", "-") == "onnxruntime":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_from_name(name)

    monkeypatch.setattr(importlib.metadata.Distribution, "from_name", staticmethod(gpu_build_only))
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)  # no cached rewrite yet: the start computes its key
    cpu = mixed_logits(RuntimeConfig(repo=repo))
    assert [a.shape for a in cpu] == [(5, 10), (7, 5, 2)]


@pytest.mark.parametrize(
    ("why", "says"),
    [
        ("libcuda.so.1: cannot open shared object file", "no NVIDIA driver on this machine"),
        ("libcudnn.so.9: cannot open shared object file", "pip install 'fpt-deploy[gpu]'"),
        ("", "no usable GPU or driver?"),
    ],
)
def test_a_cuda_provider_that_fell_back_says_what_is_missing(monkeypatch, why, says):
    from types import SimpleNamespace

    from fpt_deploy.serving.runtimes import ort_cuda

    from fpt_deploy.errors import RuntimeUnavailableError

    monkeypatch.setattr(ort_cuda, "import_onnxruntime", lambda: None)
    monkeypatch.setattr(ort_cuda, "missing_cuda_library", lambda ort: why)
    runtime = object.__new__(ort_cuda.OrtCudaRuntime)
    runtime.session = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])  # it fell back
    with pytest.raises(RuntimeUnavailableError) as err:
        runtime.check_session()
    assert says in str(err.value) and "--runtime ort" in str(err.value)
    assert ("no NVIDIA driver" in str(err.value)) == ("libcuda" in why)
