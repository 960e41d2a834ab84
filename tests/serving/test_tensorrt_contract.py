"""Contract tests of the TensorRT path against a TEST DOUBLE of ``tensorrt`` and ``cuda.bindings.runtime``.

The double (tests/serving/tensorrt_double.py) is injected through ``sys.modules`` in these tests only;
the code under test is the REAL build (``build_engine``) and the REAL serving runtime
(``TensorRTRuntime``). The double runs the engine's ONNX in ONNX Runtime on fake device memory whose
streams only execute at synchronise, and records every call, so these tests check bindings, shapes,
dtypes, ordering, error handling and cleanup; the mutation tests show they fail when the runtime
binds a buffer to the wrong name or frees memory early. A real GPU run is ``test_gpu_runtimes.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fpt_deploy.errors import ArtifactError, ConfigError, RuntimeUnavailableError

_spec = importlib.util.spec_from_file_location("tensorrt_double", Path(__file__).with_name("tensorrt_double.py"))
double = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("tensorrt_double", double)
_spec.loader.exec_module(double)

MAX_BATCH, MAX_LEN, MAX_TASKS = 8, 16, 4


@pytest.fixture
def cudart(monkeypatch):
    """The TEST DOUBLE pair, installed as ``tensorrt`` and ``cuda.bindings.runtime`` for this test."""
    rt = double.DoubleCudart()
    double.install(monkeypatch, rt, double.DoubleTensorRT(rt))
    return rt


@pytest.fixture
def engine_repo(synthetic_repo, tmp_path, cudart) -> Path:
    """A copy of the synthetic repository with a trt-fp32 engine that the REAL build code wrote (via the double)."""
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    repo = tmp_path / "repo"
    shutil.copytree(synthetic_repo, repo)
    build_engine(EngineConfig(repo=repo, max_batch=MAX_BATCH, max_len=MAX_LEN, max_tasks=MAX_TASKS))
    cudart.calls.clear(), cudart.freed.clear(), cudart.destroyed_streams.clear()  # the build's own bookkeeping
    return repo


def _tables(repo: Path, names=("tok", "vec", "vec2")):
    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    w, b = zip(*(r.tasks[n].load_norms(r.root) for n in names), strict=True)
    return np.stack(w), np.stack(b)


def _batch(B=5, L=6, D=8, T=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int64)
    mask[1::2, L // 2 :] = 0
    return rng.standard_normal((B, L, D)).astype(np.float32), mask, (np.arange(B) % T).astype(np.int64)


def _runtime(repo: Path, tables=None):
    from fpt_deploy.serving.runtimes import create_runtime, runtime_class

    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    (backbone,) = r.backbones.values()
    engine = runtime_class("tensorrt").backbone_file(backbone, r.root, "fp32")
    return create_runtime("tensorrt", engine, *(tables or _tables(repo)))


def _reference(repo: Path, tables, hidden, mask, index):
    """ONNX Runtime on the plain backbone fed each row's gathered norms: what the engine must return."""
    import onnxruntime as ort

    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    (backbone,) = r.backbones.values()
    session = ort.InferenceSession(str(backbone.path(r.root)), providers=["CPUExecutionProvider"])
    feeds = {"hidden": hidden, "attention_mask": mask, "norm_weight": tables[0][index], "norm_bias": tables[1][index]}
    return session.run(None, feeds)[0]


def _assert_clean(cudart) -> None:
    """Every device buffer freed exactly once, every stream destroyed, and no contract violation recorded."""
    assert cudart.violations == []
    assert cudart.allocations == {}, "device memory still allocated after close()"
    mallocs = [c for c in cudart.calls if c[0] == "cudaMalloc"]
    assert len(cudart.freed) == len(set(cudart.freed)) == len(mallocs)
    assert cudart.streams == {} and cudart.destroyed_streams, "the CUDA stream was not destroyed"


def run_contract(repo: Path, cudart) -> None:
    """Load the runtime, run two batches of different shapes, close: the result and the bookkeeping must hold."""
    from fpt_deploy.errors import FptDeployError

    tables = _tables(repo)
    runtime = _runtime(repo, tables)
    for B, L in ((5, 6), (MAX_BATCH, MAX_LEN)):
        hidden, mask, index = _batch(B, L)
        got = runtime.run_backbone(hidden, mask, index)
        assert cudart.violations == []
        np.testing.assert_allclose(got, _reference(repo, tables, hidden, mask, index), atol=1e-6)
    try:
        runtime.close()
    except FptDeployError as e:
        raise AssertionError(f"close() failed: {e}") from e
    _assert_clean(cudart)


def test_runtime_honours_the_contract(engine_repo, cudart):
    run_contract(engine_repo, cudart)
    names = [c[0] for c in cudart.calls]
    # bindings: every engine tensor bound once, by name, to its own allocation, before the first launch
    bound = {c[1]: c[2] for c in cudart.calls if c[0] == "set_tensor_address"}
    assert set(bound) == {"hidden", "attention_mask", "task_index", "norm_table_weight", "norm_table_bias",
                          "last_hidden"}  # fmt: skip
    assert len(set(bound.values())) == len(bound)
    assert names.index("execute_async_v3") > max(i for i, n in enumerate(names) if n == "set_tensor_address")
    # ordering of one call: shapes set, inputs copied in, launch, output copied out, then synchronise
    first = names.index("execute_async_v3")
    before = cudart.calls[:first]
    assert [c[1] for c in before if c[0] == "set_input_shape"][-3:] == ["hidden", "attention_mask", "task_index"]
    assert ("set_input_shape", "hidden", (5, 6, 8)) in before
    after = cudart.calls[first + 1 :]
    assert after[0][:2] == ("cudaMemcpyAsync", "cudaMemcpyDeviceToHost") and after[1][0] == "cudaStreamSynchronize"
    assert after[0][2] == 5 * 6 * 8 * 4  # exactly the output's bytes, float32
    # dtypes: the int64 mask and indices travel as 8-byte elements
    h2d = [c[2] for c in before if c[:2] == ("cudaMemcpyAsync", "cudaMemcpyHostToDevice")][-3:]
    assert h2d == [5 * 6 * 8 * 4, 5 * 6 * 8, 5 * 8]


def _bind_mask_to_hidden(monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt import session as mod

    allocate = mod.EngineSession._allocate

    def wrong(self):
        allocate(self)
        self.context.set_tensor_address("attention_mask", self._buffers["hidden"][0])  # the wrong buffer

    monkeypatch.setattr(mod.EngineSession, "_allocate", wrong)


def _free_input_before_sync(monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt import cuda as mod

    to_host = mod.Cuda.to_host

    def early(self, array, ptr, stream):
        to_host(self, array, ptr, stream)
        self.free(ptr)  # freed while the launch and this copy are still queued

    monkeypatch.setattr(mod.Cuda, "to_host", early)


def _skip_stream_destroy(monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt import cuda as mod

    monkeypatch.setattr(mod.Cuda, "stream_destroy", lambda self, stream: None)


def _skip_synchronize(monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt import cuda as mod

    monkeypatch.setattr(mod.Cuda, "synchronize", lambda self, stream: None)


@pytest.mark.parametrize(
    "mutate",
    [_bind_mask_to_hidden, _free_input_before_sync, _skip_stream_destroy, _skip_synchronize],
    ids=["binds-wrong-name", "frees-early", "leaks-stream", "no-synchronize"],
)
def test_contract_detects_a_broken_runtime(engine_repo, cudart, monkeypatch, mutate):
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        run_contract(engine_repo, cudart)


def test_close_waits_for_a_running_call_and_refuses_to_free_under_it(engine_repo, cudart, caplog):
    runtime = _runtime(engine_repo)
    runtime.session.close_timeout_s = 0.05
    cudart.sync_gate = threading.Event()  # the next synchronise blocks until released
    cudart.sync_entered.clear()
    hidden, mask, index = _batch()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", runtime.run_backbone(hidden, mask, index)))
    worker.start()
    assert cudart.sync_entered.wait(10)
    with caplog.at_level(logging.ERROR):
        runtime.close()  # the batcher's worker is still inside run_backbone
    assert "still running" in caplog.text and cudart.allocations and cudart.freed == []
    cudart.sync_gate.set()
    worker.join(10)
    assert result["out"].shape == hidden.shape
    runtime.close()
    _assert_clean(cudart)
    with pytest.raises(RuntimeUnavailableError, match="closed"):
        runtime.run_backbone(hidden, mask, index)


def test_cuda_free_errors_are_reported_after_freeing_the_rest(engine_repo, cudart):
    from fpt_deploy.serving.runtimes.tensorrt.cuda import CudaError

    runtime = _runtime(engine_repo)
    cudart.fail_free = {next(iter(cudart.allocations))}
    with pytest.raises(CudaError, match="cudaFree failed: invalid argument"):
        runtime.close()
    assert cudart.allocations == {} and cudart.streams == {}  # the others freed, the stream destroyed anyway


def test_norm_tables_update_live_up_to_capacity(engine_repo, cudart):
    runtime = _runtime(engine_repo)
    try:
        w, b = _tables(engine_repo)
        grown = (np.concatenate([w, w[:1] * 2.0]), np.concatenate([b, b[:1] - 1.0]))  # a 4th task, live
        runtime.set_norm_tables(*grown)
        hidden, mask, _ = _batch()
        index = np.array([3, 0, 3, 1, 2], np.int64)
        np.testing.assert_allclose(
            runtime.run_backbone(hidden, mask, index), _reference(engine_repo, grown, hidden, mask, index), atol=1e-6
        )
        spare = [np.concatenate([t, np.zeros_like(t[:2])]) for t in grown]  # a grown table: 2 unused rows
        runtime.set_norm_tables(*spare)  # 6 rows, 4 in use: fits an engine of 4
        np.testing.assert_allclose(
            runtime.run_backbone(hidden, mask, index), _reference(engine_repo, grown, hidden, mask, index), atol=1e-6
        )
        too_many = [t.copy() for t in spare]
        too_many[0][4] = w[0]  # a 5th task in the first spare row
        with pytest.raises(ConfigError, match="--max-tasks 5"):
            runtime.set_norm_tables(*too_many)
        assert runtime.num_tasks == 6 and not runtime.norm_weight[4].any()  # the refused update changed nothing
    finally:
        runtime.close()
    _assert_clean(cudart)


def test_capacity_check_names_the_build_options_that_fit(engine_repo, cudart):
    runtime = _runtime(engine_repo)
    try:
        runtime.check_capacity(max_batch_size=MAX_BATCH, seq_lens={"tok": 6, "vec": 4})  # fits: no error
        with pytest.raises(ConfigError) as err:
            runtime.check_capacity(max_batch_size=32, seq_lens={"tok": 6, "long": 40})
        message = str(err.value)
        assert "--max-batch-size 32 exceeds its 8 rows" in message and "long (40)" in message
        assert "fpt-deploy build-engine --max-batch 32 --max-len 40 --max-tasks 4" in message
        with pytest.raises(ConfigError, match="at most 8 rows of 16 tokens"):
            runtime.run_backbone(*_batch(B=9))
    finally:
        runtime.close()


def test_serving_model_refuses_an_engine_smaller_than_its_settings(engine_repo, cudart):
    from fpt_deploy.serving import RuntimeConfig, ServingModel

    with pytest.raises(ConfigError, match="build-engine --max-batch 64"):
        ServingModel(RuntimeConfig(repo=engine_repo, runtime="tensorrt", max_batch_size=64))
    assert cudart.allocations == {} and cudart.streams == {}  # the refused runtime was closed


def test_an_engine_with_wrong_tensors_is_refused(engine_repo, cudart, monkeypatch):
    monkeypatch.setattr(double.DoubleContext, "set_tensor_address", lambda self, name, ptr: False)
    with pytest.raises(ArtifactError, match="refused the device address"):
        _runtime(engine_repo)
    assert cudart.allocations == {} and cudart.streams == {}


@pytest.mark.parametrize(
    "error", [double.cudaError_t.cudaErrorNoDevice, double.cudaError_t.cudaErrorInsufficientDriver]
)
def test_no_gpu_gets_the_gpu_message(engine_repo, monkeypatch, error):
    rt = double.DoubleCudart(device_count_error=error)
    double.install(monkeypatch, rt, double.DoubleTensorRT(rt))
    with pytest.raises(RuntimeUnavailableError) as err:
        _runtime(engine_repo)
    message = str(err.value)
    assert message.startswith("TensorRT needs a CUDA GPU") and error.name in message
    assert "b'" not in message and "fpt-deploy[gpu,tensorrt]" in message


def test_missing_tensorrt_and_old_tensorrt_are_clear(engine_repo, monkeypatch):
    rt = double.DoubleCudart()
    double.install(monkeypatch, rt, None)
    with pytest.raises(RuntimeUnavailableError, match="TensorRT .*is not installed"):
        _runtime(engine_repo)
    double.install(monkeypatch, rt, double.DoubleTensorRT(rt, version="10.0.1.6"))
    with pytest.raises(RuntimeUnavailableError, match="TensorRT 10.0.1.6 is older than 10.15"):
        _runtime(engine_repo)


@pytest.mark.parametrize("factory", ["Runtime", "Builder"])
def test_a_nullptr_factory_is_a_clear_error(synthetic_repo, engine_repo, monkeypatch, factory):
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    rt = double.DoubleCudart()
    double.install(monkeypatch, rt, double.DoubleTensorRT(rt, fail=(factory,)))
    with pytest.raises(RuntimeUnavailableError, match=f"could not create its {factory.lower()}") as err:
        if factory == "Runtime":
            _runtime(engine_repo)
        else:
            build_engine(EngineConfig(repo=engine_repo, max_batch=4, max_len=8, max_tasks=4))
    assert "nullptr" not in str(err.value)


# --- the build --------------------------------------------------------------------------------------------


def test_build_sets_the_profile_checks_parity_at_min_opt_max_and_records_the_engine(synthetic_repo, tmp_path, cudart):
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    from fpt_deploy.artifacts import open_repository

    repo = tmp_path / "repo"
    shutil.copytree(synthetic_repo, repo)
    trt = sys.modules["tensorrt"]
    config = EngineConfig(repo=repo, max_batch=8, max_len=16, max_tasks=4, opt_batch=3, opt_len=5, workspace_gib=0.5)
    result = build_engine(config)
    ((network, builder_config),) = trt.built
    assert network.flags == 1 << 0  # STRONGLY_TYPED
    (profile,) = builder_config.profiles
    assert profile.shapes["hidden"] == ((1, 1, 8), (3, 5, 8), (8, 16, 8))
    assert profile.shapes["norm_table_weight"] == ((1, 2, 8), (4, 2, 8), (4, 2, 8))
    assert builder_config.pool_limits == {"WORKSPACE": 1 << 29}
    assert list(result.parity) == ["min B=1 L=1 T=1", "opt B=3 L=5 T=4", "max B=8 L=16 T=4"]
    assert result.max_abs_diff <= 1e-6 and result.tasks == ["tok", "vec", "vec2"]
    launched = [c[2] for c in cudart.calls if c[:2] == ("set_input_shape", "hidden")]
    assert launched == [(1, 1, 8), (3, 5, 8), (8, 16, 8)]  # the parity check ran the engine at each point
    _assert_clean(cudart)  # the parity session freed what it allocated
    r = open_repository(repo)
    (backbone,) = r.backbones.values()
    plan = backbone.path(r.root, "trt-fp32")  # listed and checksum-verified
    assert [i.name for i in double.plan_graph(plan).graph.input][2:] == ["task_index", "norm_table_weight",
                                                                         "norm_table_bias"]  # fmt: skip
    info = backbone.extra["engines"]["trt-fp32"]
    assert info["max_batch"] == 8 and info["gpu"] == "TEST DOUBLE GPU" and info["tensorrt"] == "10.15.1.29"
    assert info["profile"]["hidden"]["opt"] == [3, 5, 8]


def test_build_refuses_an_engine_beyond_tolerance_and_records_nothing(synthetic_repo, tmp_path, cudart, monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt import session as mod

    from fpt_deploy.errors import ExportMismatchError

    repo = tmp_path / "repo"
    shutil.copytree(synthetic_repo, repo)
    run = mod.EngineSession.run
    monkeypatch.setattr(mod.EngineSession, "run", lambda self, *a: run(self, *a) + 1e-2)
    with pytest.raises(ExportMismatchError, match="beyond --atol 0.001"):
        build_engine_small(repo)
    manifest = json.loads((repo / "manifest.json").read_text())
    assert all("engines" not in b["extra"] for b in manifest["backbones"].values())


def build_engine_small(repo: Path, **kw):
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    return build_engine(EngineConfig(repo=repo, max_batch=4, max_len=8, max_tasks=4, **kw))


def test_build_options_are_validated_together(tmp_path):
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig

    with pytest.raises(ConfigError) as err:
        EngineConfig(repo=tmp_path, max_batch=4, opt_batch=5, max_len=8, opt_len=0, max_tasks=0, workspace_gib=0,
                     atol=-1)  # fmt: skip
    assert all(s in str(err.value) for s in ("opt-batch", "opt-len", "max-tasks", "workspace-gib", "atol"))
    defaults = EngineConfig(repo=tmp_path, max_batch=64, max_len=512)
    assert (defaults.opt_batch, defaults.opt_len) == (32, 128)  # tuned inside the range, not at its maximum
    assert EngineConfig(repo=tmp_path, fp16=True).atol > EngineConfig(repo=tmp_path).atol


@pytest.mark.gpu
def test_real_cuda_python_buffers_streams_and_frees_on_a_gpu(synthetic_repo, tmp_path, monkeypatch):
    """On a GPU machine: the runtime's cuda-python calls on a REAL driver; only the engine is the double's."""
    real = pytest.importorskip("cuda.bindings.runtime", reason="needs cuda-python (the gpu extra)")
    recorder = double.RecordingCudart(real)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", recorder)
    monkeypatch.setitem(sys.modules, "tensorrt", double.DoubleTensorRT(recorder))
    repo = tmp_path / "repo"
    shutil.copytree(synthetic_repo, repo)
    result = build_engine_small(repo)  # the parity check's buffers and stream live on the GPU
    assert result.max_abs_diff <= 1e-5 and result.info["gpu"] != "TEST DOUBLE GPU"
    _assert_clean(recorder)
    recorder.calls.clear(), recorder.freed.clear(), recorder.destroyed_streams.clear()
    tables = _tables(repo)
    runtime = _runtime(repo, tables)
    hidden, mask, index = _batch(4, 8)
    np.testing.assert_allclose(
        runtime.run_backbone(hidden, mask, index), _reference(repo, tables, hidden, mask, index), atol=1e-6
    )
    runtime.close()
    _assert_clean(recorder)


def test_a_failed_launch_is_an_error_and_leaves_nothing_queued(engine_repo, cudart, monkeypatch):
    from fpt_deploy.serving.runtimes.tensorrt.cuda import CudaError

    runtime = _runtime(engine_repo)
    monkeypatch.setattr(double.DoubleContext, "execute_async_v3", lambda self, stream: False)
    with pytest.raises(CudaError, match="TensorRT failed to run"):
        runtime.run_backbone(*_batch())
    assert all(not work for work in cudart.streams.values())  # the inputs' copies finished before returning
    runtime.close()
    _assert_clean(cudart)
