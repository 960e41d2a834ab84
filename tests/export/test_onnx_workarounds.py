"""The exporter's torchlib registry is built once and reused, and the graphs come out the same."""

from __future__ import annotations

import onnx
import torch
from fpt_deploy.export import onnx_workarounds
from fpt_deploy.export.onnx_workarounds import export_onnx


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(self.linear(x), x.shape[-1:]) * scale


def _export(path) -> onnx.ModelProto:
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 8), torch.ones(8))
    export_onnx(
        _Block(),
        args,
        path,
        input_names=("x", "scale"),
        output_names=("y",),
        dynamic_axes={"x": {0: "batch"}},
        opset=18,
    )
    return onnx.load(str(path))


def test_a_second_export_reuses_the_registry_and_writes_the_same_graph(tmp_path):
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    original = ONNXRegistry.__dict__["from_torchlib"]
    onnx_workarounds._REGISTRIES.clear()
    first = _export(tmp_path / "a.onnx")  # a registry built for this export, as the exporter does
    (registry,) = onnx_workarounds._REGISTRIES.values()
    second = _export(tmp_path / "b.onnx")
    assert list(onnx_workarounds._REGISTRIES.values()) == [registry]  # reused, not rebuilt
    assert ONNXRegistry.__dict__["from_torchlib"] is original  # the exporter is left as it was
    assert first.graph.SerializeToString() == second.graph.SerializeToString()
