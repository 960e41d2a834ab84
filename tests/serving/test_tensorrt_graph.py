"""TensorRT's graph steps (operator check, task-index wrapper, fp16 rewrite) run everywhere (ONNX Runtime,
CPU) on a backbone the real exporter wrote; the engine build itself runs only where tensorrt and a CUDA
GPU exist (``tensorrt`` marker). Without them, the contract tests (test_tensorrt_contract.py) drive the
same build and runtime code through a test double."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from fpt_deploy.serving.runtimes.tensorrt.build import build_engine
from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig
from fpt_deploy.serving.runtimes.tensorrt.graph import (
    UnsupportedOperatorError,
    check_tensorrt_ops,
    convert_to_mixed_precision,
    list_op_types,
    unsupported_tensorrt_ops,
    wrap_with_task_index,
)
from onnx import TensorProto, helper

from fpt_deploy.errors import ArtifactError

TASKS = ("mnist", "bit-xor")


@pytest.fixture(scope="module")
def deploy_repo(exported_repo, tmp_path_factory) -> Path:
    """A copy of the exported tiny-bert repository (mnist, bit-xor): engines built here stay here."""
    import shutil

    repo = tmp_path_factory.mktemp("deploy") / "repo"
    shutil.copytree(exported_repo, repo)
    return repo


@pytest.fixture(scope="module")
def backbone(deploy_repo):
    import onnx

    from fpt_deploy.artifacts import open_repository

    repo = open_repository(deploy_repo)
    (artifact,) = repo.backbones.values()
    return onnx.load(str(artifact.path(repo.root)))


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _mixed_batch(T=3, B=7, L=9, N=5, D=32, seed=0):
    """Rows of T tasks interleaved, odd rows padded."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int64)
    mask[1::2, L // 2 :] = 0
    return {
        "hidden": rng.standard_normal((B, L, D)).astype(np.float32),
        "attention_mask": mask,
        "task_index": rng.integers(0, T, B).astype(np.int64),
        "norm_table_weight": (1 + 0.1 * rng.standard_normal((T, N, D))).astype(np.float32),
        "norm_table_bias": (0.1 * rng.standard_normal((T, N, D))).astype(np.float32),
    }


def test_exported_backbone_uses_only_operators_tensorrt_parses(backbone):
    ops = list_op_types(backbone)
    assert {"MatMul", "LayerNormalization", "Softmax"} <= set(ops)
    assert unsupported_tensorrt_ops(backbone) == []
    check_tensorrt_ops(backbone)  # and the opset is in TensorRT's range


def test_unsupported_operators_and_opsets_are_named():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("Attention", ["x"], ["y"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("com.microsoft", 1)]
    )
    assert unsupported_tensorrt_ops(model) == ["Unique", "com.microsoft::Attention"]
    with pytest.raises(UnsupportedOperatorError) as err:
        check_tensorrt_ops(model)
    assert "Unique" in str(err.value) and "com.microsoft::Attention" in str(err.value) and "opset 25" in str(err.value)


def test_task_index_wrapper_agrees_exactly_with_the_plain_graph(backbone):
    wrapped = wrap_with_task_index(backbone)
    assert [i.name for i in wrapped.graph.input] == [
        "hidden", "attention_mask", "task_index", "norm_table_weight", "norm_table_bias"]  # fmt: skip
    feeds = _mixed_batch()
    rows = feeds["task_index"]
    plain = _session(backbone).run(None, {
        "hidden": feeds["hidden"], "attention_mask": feeds["attention_mask"],
        "norm_weight": feeds["norm_table_weight"][rows], "norm_bias": feeds["norm_table_bias"][rows]})[0]  # fmt: skip
    got = _session(wrapped).run(None, feeds)[0]
    assert len(set(rows.tolist())) > 1  # the batch really mixes tasks
    np.testing.assert_array_equal(got, plain)


def test_wrapper_rejects_graphs_that_are_not_backbones(backbone):
    wrapped = wrap_with_task_index(backbone)
    with pytest.raises(ArtifactError, match="no input norm_weight"):
        wrap_with_task_index(wrapped)


def test_fp16_rewrite_keeps_normalisation_in_fp32(backbone):
    import onnx

    wrapped = wrap_with_task_index(backbone)
    mixed = convert_to_mixed_precision(wrapped)
    g = onnx.shape_inference.infer_shapes(mixed).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types |= {i.name: i.data_type for i in g.initializer}
    half_ops = {n.op_type for n in g.node
                if TensorProto.FLOAT16 in {types.get(t) for t in (*n.input, *n.output)}}  # fmt: skip
    assert half_ops == {"MatMul", "Cast"}  # every MatMul in fp16, nothing else
    for node in g.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert {types[t] for t in node.input if t} == {TensorProto.FLOAT}, node.name
    assert [i.type.tensor_type.elem_type for i in g.input] == [
        i.type.tensor_type.elem_type for i in wrapped.graph.input
    ]
    feeds = _mixed_batch()
    full, half = _session(wrapped).run(None, feeds)[0], _session(mixed).run(None, feeds)[0]
    assert not np.array_equal(full, half)  # it really computes in fp16 ...
    assert np.abs(full - half).max() < 5e-2  # ... and stays close


HAS_TRT = importlib.util.find_spec("tensorrt") is not None
BLOCK_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
"""


def test_graphs_past_the_size_limit_go_through_files_with_external_data(backbone, tmp_path, monkeypatch):
    """Past 2 GB a graph cannot be serialised: saved with its weights beside it, checked and inferred without
    serialising it whole. The limit is lowered so the tiny backbone takes the large path."""
    import onnx
    import onnxruntime as ort

    from fpt_deploy import onnx_files

    small_wrapped = wrap_with_task_index(backbone)
    small_mixed = convert_to_mixed_precision(small_wrapped)
    monkeypatch.setattr(onnx_files, "LARGE_BYTES", 1)
    wrapped = wrap_with_task_index(backbone)
    mixed = convert_to_mixed_precision(wrapped)
    paths = [onnx_files.save_model(m, tmp_path / f"{name}.onnx") for name, m in (("w", wrapped), ("m", mixed))]
    for path in paths:  # the weights went beside each graph
        stored = onnx.load(str(path), load_external_data=False).graph.initializer
        assert Path(f"{path}.data").stat().st_size > 0
        assert any(i.data_location == TensorProto.EXTERNAL for i in stored)
    feeds = _mixed_batch()
    for path, small in zip(paths, (small_wrapped, small_mixed), strict=True):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_array_equal(got, _session(small).run(None, feeds)[0])


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the GPU-less path cannot be shown")
@pytest.mark.parametrize("torch_blocked", [False, True], ids=["with-torch", "without-torch"])
def test_build_engine_without_a_gpu_exits_2_with_the_gpu_message(synthetic_repo, torch_blocked):
    """`fpt-deploy build-engine` needs no torch: either way it ends with the GPU message, exit 2."""
    import subprocess
    import sys

    script = (BLOCK_TORCH if torch_blocked else "") + (
        "from fpt_deploy.cli import app\n"
        f"app(['build-engine', '--repo', {str(synthetic_repo)!r}, '--max-batch', '4'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "pip install 'fpt-deploy[gpu,tensorrt]'" in last
    assert "Traceback" not in done.stderr
    assert "b'" not in last  # CUDA's error text decoded, not raw bytes
    manifest = json.loads((synthetic_repo / "manifest.json").read_text())
    assert all("engines" not in b["extra"] for b in manifest["backbones"].values())  # nothing recorded


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_engine_matches_onnxruntime_and_is_recorded(deploy_repo, fp16):
    from fpt_deploy.serving.runtimes.tensorrt.cuda import load_gpu_stack
    from fpt_deploy.serving.runtimes.tensorrt.session import EngineSession

    from fpt_deploy.artifacts import open_repository

    config = EngineConfig(repo=deploy_repo, fp16=fp16, max_batch=16, max_len=64, max_tasks=4)
    result = build_engine(config)
    assert list(result.parity) == ["min B=1 L=1 T=1", "opt B=8 L=16 T=4", "max B=16 L=64 T=4"]
    assert result.max_abs_diff <= config.atol
    assert result.tasks == sorted(TASKS)
    repo = open_repository(deploy_repo)
    (artifact,) = repo.backbones.values()
    plan = artifact.path(repo.root, result.variant)  # listed, checksum verified
    engine = artifact.extra["engines"][result.variant]
    assert engine["tasks"] == sorted(TASKS) and engine["max_tasks"] == 4
    assert engine["profile"]["hidden"]["max"] == [16, 64, 32]
    # another shape inside the profile: more tables than tasks, odd batch and length
    feeds = _mixed_batch(T=4, B=13, L=37)
    expected = _session(wrap_with_task_index(_plain(repo, artifact))).run(None, feeds)[0]
    session = EngineSession(*load_gpu_stack(), plan.read_bytes(), str(plan))
    try:
        session.set_tables(feeds["norm_table_weight"], feeds["norm_table_bias"])
        got = session.run(feeds["hidden"], feeds["attention_mask"], feeds["task_index"])
    finally:
        session.close()
    assert np.abs(got - expected).max() <= config.atol


def _plain(repo, artifact):
    import onnx

    return onnx.load(str(artifact.path(repo.root)))
