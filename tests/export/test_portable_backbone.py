"""``backbone.onnx`` is the portable file: standard ONNX operators only, no runtime's rewrite in it."""

from __future__ import annotations

import onnx

from fpt_deploy.artifacts import open_repository


def test_exported_backbone_holds_standard_operators_only(exported):
    repo = open_repository(exported.repo)
    (b,) = repo.backbones.values()
    model = onnx.load(str(b.path(repo.root)))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    ops = [n.op_type for n in model.graph.node]
    assert "Sum" not in ops  # ONNX Runtime's residual-Sum trick is the ORT runtime's, applied at load
    producer = {o: n for n in model.graph.node for o in n.output}
    feeding = [producer.get(n.input[0]) for n in model.graph.node if n.op_type == "LayerNormalization"]
    adds = [p for p in feeding if p is not None and p.op_type == "Add"]
    assert len(adds) == 2 * b.extra["config"]["num_hidden_layers"]  # plain residual Adds, two a layer
