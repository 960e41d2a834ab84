"""Runtimes are plug-ins: a registry by name whose modules load lazily; a new runtime is one class and one
registration, and the server runs through it like through the built-in ones."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServeConfig, ServingModel
from fpt_deploy.serving import runtimes as registry
from fpt_deploy.serving.executor import InferenceRequest
from fpt_deploy.serving.runtimes import Runtime, create_runtime, register_runtime, runtime_class, runtime_names

from fpt_deploy import plugins
from fpt_deploy.errors import ArtifactError, ConfigError, UnknownNameError


class NumpyRuntime(Runtime):
    """The synthetic backbone (conftest.build_backbone) in numpy: a runtime that shares no code with ``ort``.

    last = tanh(hidden * w0 + b0 + masked_mean(hidden)) * w1 + b1, with each row's own norm rows w, b.
    """

    def __init__(self, backbone_file: Path, norm_weight, norm_bias, *, threads: int | None = None) -> None:
        super().__init__(norm_weight, norm_bias)
        assert Path(backbone_file).is_file()
        self.calls = 0

    def run_backbone(self, hidden, attention_mask, task_index):
        self.calls += 1
        w, b = self.norm_weight[task_index][:, :, None], self.norm_bias[task_index][:, :, None]  # (B, 2, 1, D)
        m = attention_mask[:, :, None].astype(np.float32)  # (B, L, 1)
        mean = (hidden * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)  # (B, 1, D)
        return np.tanh(hidden * w[:, 0] + b[:, 0] + mean) * w[:, 1] + b[:, 1]


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    with registry.RUNTIMES.scratch():
        yield


def _mixed_logits(repo: Path, runtime: str, make_inputs) -> tuple[list[np.ndarray], Runtime]:
    rng = np.random.default_rng(0)
    model = ServingModel(RuntimeConfig(repo=repo, runtime=runtime, threads=1))
    try:
        batch = [InferenceRequest(model.tasks[t], make_inputs(t, rows, rng)) for t, rows in (("vec", 3), ("tok", 5))]
        return [r.logits for r in MixedBatchExecutor(model.runtime, pad_tolerance=10.0).run(batch)], model.runtime
    finally:
        model.close()


def test_a_registered_runtime_serves_like_the_built_in_one(synthetic_repo, make_inputs, clean_registry):
    register_runtime("numpy-test")(NumpyRuntime)  # the one registration line a new runtime needs
    assert "numpy-test" in runtime_names() and NumpyRuntime.name == "numpy-test"
    want, ort_runtime = _mixed_logits(synthetic_repo, "ort", make_inputs)
    got, numpy_runtime = _mixed_logits(synthetic_repo, "numpy-test", make_inputs)
    assert isinstance(numpy_runtime, NumpyRuntime) and numpy_runtime.calls >= 1
    assert type(ort_runtime).__name__ == "OrtRuntime"
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_an_entry_point_registers_a_runtime_from_another_package(clean_registry, monkeypatch):
    value = f"{NumpyRuntime.__module__}:{NumpyRuntime.__qualname__}"
    ep = EntryPoint(name="numpy-ep", value=value, group=registry.ENTRY_POINT_GROUP)
    plugin = SimpleNamespace(metadata={"Name": "numpy-plugin"}, version="1.0")
    found = plugins.group_entry_points
    monkeypatch.setattr(
        plugins,
        "group_entry_points",
        lambda group: found(group) + ([(ep, plugin)] if group == registry.ENTRY_POINT_GROUP else []),
    )
    registry.RUNTIMES.reset()
    assert runtime_names()[:3] == ["ort", "ort-cuda", "tensorrt"] and "numpy-ep" in runtime_names()
    assert runtime_class("numpy-ep") is NumpyRuntime


def test_unknown_runtime_names_list_the_registered_ones():
    with pytest.raises(UnknownNameError, match="unknown runtime 'onnx'.*ort, ort-cuda, tensorrt"):
        runtime_class("onnx")
    with pytest.raises(ConfigError, match="runtime must be one of ort, ort-cuda, tensorrt"):
        ServeConfig(repo=Path("repo"), runtime="onnx")


def test_registering_something_that_is_not_a_runtime_is_refused(clean_registry):
    with pytest.raises(TypeError, match="Runtime subclass"):
        register_runtime("bad")(object)
    assert "bad" not in runtime_names()


def test_importing_the_registry_imports_no_runtime_module():
    code = (
        "import json, sys; from fpt_deploy.serving.runtimes import runtime_names; "
        "assert runtime_names()[:3] == ['ort', 'ort-cuda', 'tensorrt']; "
        "print(json.dumps([m if m.startswith('fpt_deploy') else m.split('.')[0] for m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    runtime_modules = {f"fpt_deploy.serving.runtimes.{m}" for m in ("ort", "ort_cuda", "tensorrt", "ort_rewrite")}
    assert "fpt_deploy.serving.runtimes" in loaded and not loaded & runtime_modules
    assert not loaded & {"onnxruntime", "tensorrt", "cuda", "torch", "onnxscript"}


def test_norm_tables_are_replaced_live_for_added_and_removed_tasks(synthetic_repo):
    model = ServingModel(RuntimeConfig(repo=synthetic_repo, threads=1))
    try:
        runtime = model.runtime
        weight, bias = runtime.norm_weight.copy(), runtime.norm_bias.copy()  # (T, N_norm, D)
        rng = np.random.default_rng(1)
        hidden, mask = rng.standard_normal((2, 4, weight.shape[2]), dtype=np.float32), np.ones((2, 4), np.int64)
        before = runtime.run_backbone(hidden, mask, np.array([0, 1]))
        new = (weight[:1] * 2, bias[:1] - 1)  # a task loaded live: one more row
        runtime.set_norm_tables(np.concatenate([weight, new[0]]), np.concatenate([bias, new[1]]))
        assert runtime.num_tasks == len(weight) + 1
        np.testing.assert_array_equal(runtime.run_backbone(hidden, mask, np.array([0, 1])), before)
        added = runtime.run_backbone(hidden, mask, np.array([len(weight), len(weight)]))
        reference = NumpyRuntime(synthetic_repo / "manifest.json", *new)
        np.testing.assert_allclose(added, reference.run_backbone(hidden, mask, np.array([0, 0])), atol=1e-5)
        with pytest.raises(ArtifactError, match="do not fit"):
            runtime.set_norm_tables(weight[:, :, :-1], bias[:, :, :-1])  # another backbone's width
        assert runtime.num_tasks == len(weight) + 1  # the refused tables changed nothing
    finally:
        model.close()


def test_create_runtime_builds_the_named_runtime(synthetic_repo):
    backbone = next((synthetic_repo / "backbones").glob("*/backbone.onnx"))
    weight = np.ones((1, 2, 8), np.float32)
    runtime = create_runtime("ort", backbone, weight, 0 * weight, threads=1)
    assert runtime.name == "ort" and runtime.threads == 1 and runtime.num_tasks == 1
