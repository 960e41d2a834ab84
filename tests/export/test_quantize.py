"""The int8 backbone variant: written, recorded, runnable, and refused when a task loses accuracy."""

from __future__ import annotations

import fpt_deploy.export.exporter as exporter
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fpt_deploy.export import ExportConfig, QuantizationAccuracyError, export_task
from fpt_deploy.export.quantize import activation_ranges, check_accuracy_drop, quantize_backbone_int8, smooth_matmuls
from fpt_deploy.export.validate import ort_session
from typer.testing import CliRunner

from fpt_deploy.artifacts import open_repository


def test_int8_variant_is_added_beside_the_float_backbone(repo_copy, tiny_checkpoints):
    repo = open_repository(repo_copy)
    (fp,) = repo.backbones
    fp32 = repo.backbones[fp].path(repo.root)
    before = (fp32.read_bytes(), fp32.stat().st_mtime_ns)
    config = ExportConfig(checkpoints=[tiny_checkpoints["mnist"]], repo=repo_copy, quantize="int8")
    result = export_task(config)
    repo = open_repository(repo_copy)
    b = repo.backbones[fp]
    assert set(b.files) == {"fp32", "int8"}
    assert (fp32.read_bytes(), fp32.stat().st_mtime_ns) == before, "the float backbone is not rewritten"
    int8 = b.path(repo.root, "int8")
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert set(result.accuracy) == {"mnist", "bit-xor"}, "every task on the body is checked, not just mnist"
    assert b.extra["int8"]["accuracy"] == result.accuracy
    # The norm tables stay float inputs: the same per-task norms feed the int8 graph.
    session = ort_session(int8)
    assert {i.name: i.type for i in session.get_inputs()}["norm_weight"] == "tensor(float)"
    n, d = b.num_norms, b.hidden_size
    out = session.run(
        None,
        {
            "hidden": np.ones((2, 5, d), np.float32),
            "attention_mask": np.ones((2, 5), np.int64),
            "norm_weight": np.ones((2, n, d), np.float32),
            "norm_bias": np.zeros((2, n, d), np.float32),
        },
    )
    assert out[0].shape == (2, 5, d)


def test_accuracy_drop_above_tolerance_is_refused_unless_forced():
    report = {"mnist": {"fp32": 0.90, "int8": 0.89}, "bit-xor": {"fp32": 0.60, "int8": 0.60}}
    with pytest.raises(QuantizationAccuracyError, match="mnist 90.00% -> 89.00%"):
        check_accuracy_drop(report, tolerance_points=0.5, force=False)
    assert check_accuracy_drop(report, tolerance_points=0.5, force=True) == ["mnist"]
    assert check_accuracy_drop(report, tolerance_points=1.5, force=False) == []


def test_cli_refuses_a_lossy_int8_backbone_with_exit_2_unless_forced(repo_copy, tiny_checkpoints, monkeypatch):
    from fpt_deploy.cli import app

    real_accuracy, real_session = exporter.accuracy, exporter.ort_session
    int8_sessions = set()

    def session(path):  # remembers which sessions run an int8 graph
        s = real_session(path)
        if str(path).endswith(".int8.onnx"):
            int8_sessions.add(id(s))
        return s

    def lossy(ort_task, backbone, raw, labels):  # int8 graphs score 2 points lower than they do
        acc = real_accuracy(ort_task, backbone, raw, labels)
        return acc - 0.02 if id(backbone) in int8_sessions else acc

    monkeypatch.setattr(exporter, "ort_session", session)
    monkeypatch.setattr(exporter, "accuracy", lossy)
    args = ["export", "--checkpoint", str(tiny_checkpoints["mnist"]), "--repo", str(repo_copy), "--quantize", "int8"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "--force" in refused.output and "mnist" in refused.output
    repo = open_repository(repo_copy)
    assert set(repo.backbone_for("mnist").files) == {"fp32"}
    assert not list(repo_copy.rglob("*.int8.onnx"))
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    b = open_repository(repo_copy).backbone_for("mnist")
    assert set(b.files) == {"fp32", "int8"} and b.extra["int8"]["forced"] == ["bit-xor", "mnist"]


def _feed(b, rows=3, length=6, seed=0):
    rng = np.random.default_rng(seed)
    n, d = b.num_norms, b.hidden_size
    return {
        "hidden": rng.standard_normal((rows, length, d), dtype=np.float32),
        "attention_mask": np.ones((rows, length), np.int64),
        "norm_weight": (1 + 0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
        "norm_bias": (0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
    }


def test_int8_graph_quantizes_every_weight_matmul_per_channel_and_runs_int8_kernels(exported, tmp_path):

    repo = open_repository(exported.repo)
    (b,) = repo.backbones.values()
    fp32 = b.path(repo.root)
    int8 = tmp_path / "backbone.int8.onnx"
    quantize_backbone_int8(fp32, int8)
    model = onnx.load(str(int8))
    inits = {i.name: i for i in model.graph.initializer}
    # No MatMul is left with a float weight (the FFN output layers included) ...
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    integer = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 4 * b.extra["config"]["num_hidden_layers"]  # qkv, attention out, FFN in, FFN out
    # ... and each weight has one scale per output channel.
    for n in integer:
        weight, zero_point = inits[n.input[1]], inits[n.input[3]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(zero_point.dims) == [weight.dims[1]]
    # The file stays portable (standard operators, no runtime's rewrite); ORT runs integer kernels on it.
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "Sum" not in {n.op_type for n in model.graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "DynamicQuantizeMatMul" in ops, ops
    # The int8 body stays close to the float one, row by row, with every row's own norms.
    feed = _feed(b)
    want, got = ort_session(fp32).run(None, feed)[0], ort_session(int8).run(None, feed)[0]
    assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()


def test_smoothquant_keeps_the_float_arithmetic_and_feeds_the_int8_graph(exported, tmp_path):
    repo = open_repository(exported.repo)
    (b,) = repo.backbones.values()
    fp32 = b.path(repo.root)
    model = onnx.load(str(fp32))
    calibration = [_feed(b, seed=2), _feed(b, rows=2, length=4, seed=3)]
    ranges = activation_ranges(model, calibration)
    layers = b.extra["config"]["num_hidden_layers"]
    assert len(ranges) == 4 * layers  # Q, K and V read one (fused) input: one range, one Mul
    assert smooth_matmuls(model, ranges, alpha=0.75) == 4 * layers
    onnx.checker.check_model(model)
    feed = _feed(b, seed=4)
    want = ort_session(fp32).run(None, feed)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    int8 = tmp_path / "backbone.int8.onnx"
    quantize_backbone_int8(fp32, int8, calibration=calibration)
    q = onnx.load(str(int8))
    assert len([n for n in q.graph.node if n.name.endswith("_smooth")]) == 4 * layers
    assert len([n for n in q.graph.node if n.op_type == "MatMulInteger"]) == 4 * layers
    assert not list(tmp_path.glob("*.smoothed.onnx")), "the smoothed float graph is a temporary"
    got = ort_session(int8).run(None, feed)[0]
    assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()
