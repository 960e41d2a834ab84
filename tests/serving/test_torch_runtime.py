"""The torch runtime on the exported tiny repository, on the CPU: the same answers as ort, exact task routing
in mixed batches, the parity guard, and a real server answering tritonclient with ``--runtime torch``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch runtime needs torch (pip install 'fpt-deploy[torch]')")

from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServingModel  # noqa: E402
from fpt_deploy.serving.executor import InferenceRequest  # noqa: E402

from fpt_deploy.errors import ConfigError, ExportMismatchError, RuntimeUnavailableError  # noqa: E402

# fp32 torch vs the fp32 ONNX in ONNX Runtime: the same weights, only the kernels' summation order differs.
FP32_ATOL = 1e-4


def _batch(model, seed: int = 0) -> list[InferenceRequest]:
    rng = np.random.default_rng(seed)
    return [
        InferenceRequest(model.tasks["mnist"], rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)),
        InferenceRequest(model.tasks["bit-xor"], rng.integers(0, 2, (7, 10), dtype=np.uint8)),
        InferenceRequest(model.tasks["mnist"], rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)),
    ]


def _logits(config: RuntimeConfig) -> list[np.ndarray]:
    model = ServingModel(config)
    try:
        return [r.logits for r in MixedBatchExecutor(model.runtime, pad_tolerance=10.0).run(_batch(model))]
    finally:
        model.close()


@pytest.fixture(scope="module")
def ort_logits(exported_repo) -> list[np.ndarray]:
    return _logits(RuntimeConfig(repo=exported_repo, threads=1))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_answers_like_ort(exported_repo, ort_logits, precision):
    from fpt_deploy.serving.runtimes.torch_runtime import PARITY_ATOL

    got = _logits(RuntimeConfig(repo=exported_repo, runtime="torch", device="cpu", precision=precision, threads=1))
    for a, b in zip(ort_logits, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))  # labels equal
        np.testing.assert_allclose(b, a, atol=FP32_ATOL if precision == "fp32" else PARITY_ATOL[precision])


@pytest.fixture(scope="module")
def runtime(exported_repo):
    """The torch runtime over three norm rows: mnist, bit-xor, and a made-up third task."""
    from fpt_deploy.serving.runtimes import create_runtime

    from fpt_deploy.artifacts import open_repository

    repo = open_repository(exported_repo)
    (backbone,) = repo.backbones.values()
    w, b = zip(*(repo.tasks[t].load_norms(repo.root) for t in ("mnist", "bit-xor")), strict=True)
    w, b = np.stack([*w, w[0] * 1.5]), np.stack([*b, b[1] - 0.5])
    rt = create_runtime("torch", backbone.path(repo.root), w, b, threads=1, device="cpu")
    yield rt
    rt.close()


def test_each_row_of_a_mixed_batch_gets_its_own_tasks_norms(runtime):
    rng = np.random.default_rng(3)
    D = runtime.norm_weight.shape[2]
    hidden = rng.standard_normal((6, 5, D)).astype(np.float32)
    mask = np.ones((6, 5), np.int64)
    mask[[1, 4], 3:] = 0
    index = np.array([2, 0, 1, 2, 1, 0])
    mixed = runtime.run_backbone(hidden, mask, index)
    for r, t in enumerate(index):  # each row alone, with its task's index: the same numbers
        alone = runtime.run_backbone(hidden[r : r + 1], mask[r : r + 1], np.array([t]))
        np.testing.assert_allclose(mixed[r], alone[0], atol=1e-5)
        other = runtime.run_backbone(hidden[r : r + 1], mask[r : r + 1], np.array([(t + 1) % 3]))
        assert np.abs(other[0] - mixed[r]).max() > 1e-2  # another task's norms change the row


def test_norm_tables_are_replaced_live(runtime):
    weight, bias = runtime.norm_weight.copy(), runtime.norm_bias.copy()
    D = weight.shape[2]
    hidden, mask = np.ones((1, 3, D), np.float32), np.ones((1, 3), np.int64)
    before = runtime.run_backbone(hidden, mask, np.array([0]))
    try:
        runtime.set_norm_tables(weight[[1, 0, 2]], bias[[1, 0, 2]])  # rows swapped: task 0 is now row 1
        np.testing.assert_allclose(runtime.run_backbone(hidden, mask, np.array([1])), before, atol=1e-6)
    finally:
        runtime.set_norm_tables(weight, bias)


def _bad_body(monkeypatch, scale: float):
    """Every body the runtime builds comes out with one weight scaled: not the repository's body any more."""
    from fpt_deploy.serving.runtimes import torch_runtime

    build = torch_runtime.body_from_repository

    def perturbed(*args):
        body = build(*args)
        body.blocks[0].ff_in.weight.mul_(scale)
        return body

    monkeypatch.setattr(torch_runtime, "body_from_repository", perturbed)


def test_the_parity_guard_refuses_a_body_that_differs_from_the_onnx(exported_repo, monkeypatch):
    _bad_body(monkeypatch, 3.0)
    with pytest.raises(ExportMismatchError, match=r"fp16 torch body on cpu differs from the repository's fp32 ONNX"):
        ServingModel(RuntimeConfig(repo=exported_repo, runtime="torch", device="cpu", precision="fp16", threads=1))


def test_the_parity_guard_refuses_a_low_precision_body_beyond_its_tolerance(exported_repo, monkeypatch):
    from fpt_deploy.serving.runtimes.torch_runtime import TorchRuntime

    monkeypatch.setattr(TorchRuntime, "parity_atol", {"fp32": 1e-3, "bf16": 1e-6, "fp16": 1e-6})
    with pytest.raises(ExportMismatchError, match=r"bf16 torch body .* tolerance 1e-06.*--precision"):
        ServingModel(RuntimeConfig(repo=exported_repo, runtime="torch", device="cpu", precision="bf16", threads=1))
    ServingModel(RuntimeConfig(repo=exported_repo, runtime="torch", device="cpu", threads=1)).close()  # fp32 passes


def test_options_that_cannot_run_here_are_refused(exported_repo):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a cuda device"):
        ServingModel(RuntimeConfig(repo=exported_repo, runtime="torch", device="cpu", cuda_graphs=True))
    with pytest.raises(ConfigError, match="runs the fp32 body.*--precision"):
        ServingModel(RuntimeConfig(repo=exported_repo, runtime="torch", backbone_variant="int8"))
    problems = RuntimeConfig(repo=exported_repo, runtime="torch", precision="fp8").problems()
    assert "precision must be one of fp32, bf16, fp16 (got 'fp8')" in problems


def test_without_torch_the_torch_runtime_says_which_extra_to_install(exported_repo):
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def blocked(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise ImportError('torch is blocked in this test')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = blocked\n"
        "from fpt_deploy.serving import RuntimeConfig, ServingModel\n"
        "from fpt_deploy.errors import RuntimeUnavailableError\n"
        "try:\n"
        f"    ServingModel(RuntimeConfig(repo={str(exported_repo)!r}, runtime='torch'))\n"
        "except RuntimeUnavailableError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'fpt-deploy[torch]'" in done.stdout, done.stderr
    assert RuntimeUnavailableError  # the type the message came with


def test_serve_runtime_torch_answers_tritonclient(exported_repo, ort_logits):
    import tritonclient.http as httpclient
    from fpt_deploy.serving import ServeConfig

    from tests.serving.live import live_server

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)  # the first request of _batch(seed=0)
    config = ServeConfig(repo=exported_repo, runtime="torch", device="cpu", threads=1, port=0)
    with live_server(config) as server:
        assert server.state.model.runtime.name == "torch"
        client = httpclient.InferenceServerClient(server.http_url)
        tensor = httpclient.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        logits = client.infer("mnist", [tensor]).as_numpy("logits")
    np.testing.assert_allclose(logits, ort_logits[0], atol=FP32_ATOL)
