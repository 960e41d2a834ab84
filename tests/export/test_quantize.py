"""The int8 backbone variant: written, recorded, runnable, and refused when a task loses accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import export.exporter
from export import ExportConfig, QuantizationAccuracyError, export_task
from export.quantize import check_accuracy_drop
from export.validate import ort_session
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
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
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

    real = export.exporter.accuracy

    def lossy(ort_task, backbone, raw, labels):  # int8 graphs score 2 points lower than they do
        acc = real(ort_task, backbone, raw, labels)
        return acc - 0.02 if backbone._model_path.endswith(".int8.onnx") else acc

    monkeypatch.setattr(export.exporter, "accuracy", lossy)
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
