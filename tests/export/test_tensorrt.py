"""TensorRT: the operator check, the task-index wrapper and the fp16 rewrite run everywhere (ONNX Runtime,
CPU); the engine build runs only where tensorrt and a CUDA GPU exist (``tensorrt`` marker)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from fpt_deploy.export.tensorrt import (
    EngineConfig,
    UnsupportedOperatorError,
    build_trt_engine,
    check_tensorrt_ops,
    convert_to_mixed_precision,
    list_op_types,
    unsupported_tensorrt_ops,
    wrap_with_task_index,
)
from onnx import TensorProto, helper

from fpt_deploy.errors import ArtifactError, ConfigError, RuntimeUnavailableError

TASKS = ("mnist", "bit-xor")


@pytest.fixture(scope="module")
def deploy_repo(tiny_checkpoints, tmp_path_factory) -> Path:
    """A deployment repository with mnist and bit-xor on tiny-bert, written by the real exporter."""
    from fpt_deploy.export.config import ExportConfig
    from fpt_deploy.export.exporter import export_task

    repo = tmp_path_factory.mktemp("deploy")
    export_task(ExportConfig(checkpoints=[tiny_checkpoints[t] for t in TASKS], repo=repo, validation_rows=8))
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


def test_engine_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        EngineConfig(repo=tmp_path, max_batch=0, max_len=8, opt_len=9, max_tasks=0, workspace_gib=0)
    assert all(s in str(err.value) for s in ("max-batch", "opt-len", "max-tasks", "workspace"))


HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the unavailable path cannot be shown here")
def test_build_without_tensorrt_is_a_clear_error_and_cli_exit_2(deploy_repo):
    from typer.testing import CliRunner

    from fpt_deploy.cli import app

    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"):
        build_trt_engine(EngineConfig(repo=deploy_repo, max_batch=4, max_len=64, max_tasks=4))
    result = CliRunner().invoke(app, ["build-engine", "--repo", str(deploy_repo), "--max-batch", "4"])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output
    manifest = json.loads((deploy_repo / "manifest.json").read_text())
    assert all("engines" not in b["extra"] for b in manifest["backbones"].values())  # nothing recorded


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_engine_matches_onnxruntime_and_is_recorded(deploy_repo, fp16):
    import tensorrt as trt
    from fpt_deploy.export.tensorrt import run_trt_engine

    from fpt_deploy.artifacts import open_repository

    result = build_trt_engine(EngineConfig(repo=deploy_repo, fp16=fp16, max_batch=16, max_len=64, max_tasks=4))
    assert result.max_abs_diff <= (5e-2 if fp16 else 1e-3)
    assert result.tasks == sorted(TASKS)
    repo = open_repository(deploy_repo)
    (artifact,) = repo.backbones.values()
    plan = artifact.path(repo.root, result.variant)  # listed, checksum verified
    engine = artifact.extra["engines"][result.variant]
    assert engine["tasks"] == sorted(TASKS) and engine["max_tasks"] == 4
    assert engine["profile"]["hidden"]["max"] == [16, 64, 32]
    # another shape inside the profile: more tables than tasks, full batch, longest rows
    feeds = _mixed_batch(T=4, B=16, L=64)
    expected = _session(wrap_with_task_index(_plain(repo, artifact))).run(None, feeds)[0]
    got = run_trt_engine(trt, plan.read_bytes(), feeds)
    assert np.abs(got - expected).max() <= (5e-2 if fp16 else 1e-3)


def _plain(repo, artifact):
    import onnx

    return onnx.load(str(artifact.path(repo.root)))
