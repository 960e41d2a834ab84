"""ONNX Runtime's transformer fusions (fpt_deploy.ort_fusion): applied at load, same outputs, safe fallback."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.graphs import write_backbone_graph
from fpt_deploy.backbones import load_backbone
from fpt_deploy.ort_fusion import fuse_for_ort


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


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt2"])
def test_fused_backbone_uses_fused_attention_and_matches_the_portable_graph(backbone, tmp_path):
    body = load_backbone(backbone)
    path = tmp_path / "backbone.onnx"
    write_backbone_graph(body, path, 18)
    before = path.read_bytes()
    fused = fuse_for_ort(path)
    assert fused is not None
    assert path.read_bytes() == before  # the portable file is never rewritten
    ops = {n.op_type for n in onnx.load_from_string(fused).graph.node}
    assert "Attention" in ops and "Sum" in ops  # one packed attention op a layer; residual Sums kept
    assert not {"MultiHeadAttention", "Split", "Softmax"} & ops  # q, k, v projection and softmax folded in
    plain_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in plain_ops and "Split" in plain_ops
    feeds = _feeds(body)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(fused, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(got - plain)[real].max() < 1e-5


def test_a_failing_rewrite_falls_back_to_the_plain_graph_with_a_warning(tmp_path, monkeypatch, caplog):
    import onnxscript.rewriter.ort_fusions as fusions

    body = load_backbone("tiny-bert")
    path = tmp_path / "backbone.onnx"
    write_backbone_graph(body, path, 18)

    def broken(model):
        raise RuntimeError("pattern matcher exploded")

    monkeypatch.setattr(fusions, "optimize_for_ort", broken)
    with caplog.at_level(logging.WARNING, logger="fpt_deploy.ort_fusion"):
        assert fuse_for_ort(path) is None
    assert "pattern matcher exploded" in caplog.text and "plain graph" in caplog.text


def test_an_unreadable_file_is_left_to_onnx_runtime_to_report(tmp_path):
    path = tmp_path / "backbone.onnx"
    path.write_bytes(b"not an onnx graph")
    assert fuse_for_ort(path) is None
