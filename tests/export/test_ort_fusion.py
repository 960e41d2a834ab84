"""ONNX Runtime's transformer fusions (fpt_deploy.ort_fusion): applied at load, same outputs, safe fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fpt_deploy.export.graphs import write_backbone_graph

import fpt_deploy.ort_fusion as ort_fusion
from fpt_deploy.backbones import load_backbone
from fpt_deploy.ort_fusion import fuse_to_file, ort_graph


def _feeds(body, rows=4, length=9, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    n, d = body.num_norms, body.hidden_size
    mask = np.ones((rows, length), np.int64)
    mask[1:, 5:] = 0  # right padding, as the heads write it
    return {
        "hidden": rng.standard_normal((rows, length, d), dtype=np.float32),
        "attention_mask": mask,
        "norm_weight": (1 + 0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
        "norm_bias": (0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
    }


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory) -> dict:
    out = {}
    for name in ("tiny-bert", "tiny-gpt2"):
        body = load_backbone(name)
        path = tmp_path_factory.mktemp(name) / "backbone.onnx"
        write_backbone_graph(body, path, 18)
        out[name] = (body, path)
    return out


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "child-process"])
def test_fused_backbone_uses_fused_attention_and_matches_the_portable_graph(
    backbone, in_child, backbone_files, tmp_path, monkeypatch
):
    body, path = backbone_files[backbone]
    if in_child:  # the path real backbones take
        monkeypatch.setattr(ort_fusion, "IN_PROCESS_BYTES", 0)
    before = path.read_bytes()
    counts = fuse_to_file(path, tmp_path / "fused.onnx")
    assert counts and counts["packed_attention"] == 2  # both layers of the tiny bodies
    assert path.read_bytes() == before  # the portable file is never rewritten
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert "Attention" in ops and "Sum" in ops  # one packed attention op a layer; residual Sums kept
    assert not {"MultiHeadAttention", "Split", "Softmax"} & ops  # q, k, v projection and softmax folded in
    plain_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in plain_ops and "Split" in plain_ops
    feeds = _feeds(body)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(got - plain)[real].max() < 1e-5


def test_ort_graph_yields_a_temporary_fused_copy_and_removes_it(backbone_files):
    _, path = backbone_files["tiny-bert"]
    with ort_graph(path) as graph:
        assert graph != str(path) and "Attention" in {n.op_type for n in onnx.load(graph).graph.node}
        ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    assert not Path(graph).exists()


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "child-process"])
def test_a_failing_rewrite_falls_back_to_the_plain_graph_with_a_warning(
    in_child, backbone_files, tmp_path, monkeypatch, caplog
):
    _, path = backbone_files["tiny-bert"]
    if in_child:  # the child cannot be monkeypatched: give it a graph the rewriter rejects
        monkeypatch.setattr(ort_fusion, "IN_PROCESS_BYTES", 0)
        monkeypatch.setattr(ort_fusion.sys, "executable", "/nonexistent/python")
        expected = "nonexistent"
    else:
        import onnxscript.rewriter.ort_fusions as fusions

        def broken(model):
            raise RuntimeError("pattern matcher exploded")

        monkeypatch.setattr(fusions, "optimize_for_ort", broken)
        expected = "pattern matcher exploded"
    with caplog.at_level(logging.WARNING, logger="fpt_deploy.ort_fusion"):
        assert fuse_to_file(path, tmp_path / "fused.onnx") is None
        with ort_graph(path) as graph:
            assert graph == str(path)
    assert expected in caplog.text and "plain graph" in caplog.text
    assert not (tmp_path / "fused.onnx").exists()


def test_the_child_process_reports_failures_and_nothing_to_fuse(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    assert ort_fusion.main([str(bad), str(tmp_path / "out.onnx")]) == 3  # unreadable: ORT's load reports it
    assert fuse_to_file(tmp_path / "missing.onnx", tmp_path / "out.onnx") is None
    assert not (tmp_path / "out.onnx").exists()
