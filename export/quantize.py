"""The int8 backbone variant: ONNX Runtime dynamic quantization of the body's weight MatMuls.

Only MatMuls with a constant weight are quantized (int8 weights, per-batch uint8 activations, which
ORT runs with VNNI on AVX-512 CPUs), except the FFN output layers (``_down_projections``). The norm
scales and biases are graph inputs, so they stay float32 and every task keeps its own; attention's
activation-by-activation MatMuls stay float too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fpt_deploy.errors import FptDeployError

log = logging.getLogger(__name__)

METHOD = "onnxruntime dynamic quantization: int8 weights per tensor, MatMuls except FFN output layers"


class QuantizationAccuracyError(FptDeployError, ValueError):
    """A quantized backbone loses more held-out accuracy on a task than the tolerance allows."""


def _down_projections(model) -> list[str]:
    """Weight MatMuls that project down (more input features than outputs): the FFN output layers.

    Their input is the GELU output, whose few large outliers leave per-tensor int8 activations too
    coarse: quantizing them cost MiniLM 13 accuracy points on MNIST; keeping them float, 0.2.
    """
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and len(shapes.get(n.input[1], ())) == 2
        and shapes[n.input[1]][0] > shapes[n.input[1]][1]
    ]


def quantize_backbone_int8(source: Path, target: Path) -> None:
    """Write the int8 variant of the float backbone graph ``source`` to ``target``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep_float = _down_projections(onnx.load(str(source), load_external_data=False))
    log.info("quantizing %s to int8 (%d FFN output MatMuls stay float)", source, len(keep_float))
    root = logging.getLogger()  # ORT's quantizer logs every skipped tensor on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep_float,
            weight_type=QuantType.QInt8,
            per_channel=False,
            extra_options={"MatMulConstBOnly": True},  # attention's Q.K^T and P.V keep float activations
        )
    finally:
        root.setLevel(level)


def check_accuracy_drop(report: dict[str, dict[str, float]], tolerance_points: float, force: bool) -> list[str]:
    """Tasks whose int8 accuracy is more than ``tolerance_points`` below float; raise unless ``force``.

    ``report`` maps a task to ``{"fp32": accuracy, "int8": accuracy}`` (fractions).
    """
    for name, r in report.items():
        log.info(
            "%s: held-out accuracy fp32 %.2f%%, int8 %.2f%% (%+.2f points)",
            name,
            100 * r["fp32"],
            100 * r["int8"],
            100 * (r["int8"] - r["fp32"]),
        )
    worse = [n for n, r in report.items() if 100 * (r["fp32"] - r["int8"]) > tolerance_points]
    if worse and not force:
        detail = ", ".join(f"{n} {100 * report[n]['fp32']:.2f}% -> {100 * report[n]['int8']:.2f}%" for n in worse)
        raise QuantizationAccuracyError(
            f"the int8 backbone loses more than {tolerance_points:g} accuracy points on {detail}; the int8 variant "
            "was not added to the repository (the float export is complete). Pass --force to keep it anyway, or "
            "raise the tolerance"
        )
    if worse:
        log.warning(
            "int8 kept despite an accuracy loss above %g points on %s (--force)", tolerance_points, ", ".join(worse)
        )
    return worse
