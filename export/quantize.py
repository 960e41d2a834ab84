"""The int8 backbone variant: ONNX Runtime dynamic quantization of every weight MatMul of the body.

Weights are int8 **per output channel**; activations uint8, scaled per call from the batch itself
(dynamic), which ORT runs as ``DynamicQuantizeMatMul`` with VNNI on AVX-512 CPUs. Before that the
float graph is smoothed (SmoothQuant, Xiao et al. 2022; ``smooth_matmuls``): each weight MatMul's
input is multiplied by a constant ``1/s`` per channel and the weight's rows by ``s`` (exact in float),
which moves the activations' outlier channels into the per-channel weight scales. ``s`` comes from
activation ranges on calibration rows (the exporter passes each task's first held-out rows), so the
file depends on the tasks present when it was written; a task exported later is served by the same
file and still checked for accuracy. The norm scales and biases are graph inputs, so they stay
float32 and every task keeps its own; attention's activation-by-activation MatMuls stay float.
The file stays portable like the float one: the ONNX Runtime runtime writes the residual ``Add`` in
front of each LayerNormalization as ``Sum`` when it loads it (``serving/runtimes/ort_rewrite.py``).

Why per-channel weights, dynamic activation scales and SmoothQuant at ``SMOOTH_ALPHA``, and what the
alternatives (per-tensor weights, static QDQ, other alphas) cost in accuracy: BENCHMARKS.md, "int8
backbone: the choices measured".
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fpt_deploy.errors import FptDeployError
from fpt_deploy.onnx_files import is_large, save_model

log = logging.getLogger(__name__)

SMOOTH_ALPHA = 0.75  # changed the fewest predictions of the alphas tried (BENCHMARKS.md, int8 backbone)
METHOD = (
    f"SmoothQuant (alpha {SMOOTH_ALPHA}) + onnxruntime dynamic quantization: int8 weights per output channel, "
    "every weight MatMul"
)


class QuantizationAccuracyError(FptDeployError, ValueError):
    """A quantized backbone loses more held-out accuracy on a task than the tolerance allows."""


def quantize_backbone_int8(source: Path, target: Path, calibration=None, alpha: float = SMOOTH_ALPHA) -> None:
    """Write the int8 variant of the float backbone graph ``source`` to ``target``.

    With ``calibration`` (backbone feeds: hidden, attention_mask, norm_weight, norm_bias), the float
    graph is first smoothed (``smooth_matmuls``) with activation ranges measured on those feeds.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8 (dynamic, per-channel weights, every weight MatMul)", source)
    if calibration:
        model = onnx.load(str(source))
        n = smooth_matmuls(model, activation_ranges(model, calibration), alpha)
        log.info("SmoothQuant (alpha %g): %d MatMuls smoothed", alpha, n)
        smoothed = save_model(model, Path(str(target) + ".smoothed.onnx"))  # external data past 2 GB
        source = smoothed
    root = logging.getLogger()  # ORT's quantizer logs every skipped tensor on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},  # attention's Q.K^T and P.V keep float activations
        )
    finally:
        root.setLevel(level)
        if calibration:
            Path(source).unlink(missing_ok=True)
            Path(f"{source}.data").unlink(missing_ok=True)  # its weights, when it was saved past 2 GB


def activation_ranges(model, feeds) -> dict:
    """max |x| per input channel of every weight MatMul's activation input, over the calibration ``feeds``."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    names = sorted({n.input[0] for n in _weight_matmuls(model)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if is_large(probe):  # past 2 GB a graph reaches ONNX Runtime as a file with its weights beside it
        with tempfile.TemporaryDirectory(prefix="fpt-probe-") as tmp:
            path = save_model(probe, Path(tmp) / "probe.onnx")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ranges: dict = {}
    for feed in feeds:
        for name, x in zip(names, sess.run(names, feed), strict=True):
            m = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
            ranges[name] = m if name not in ranges else np.maximum(ranges[name], m)
    return ranges


def smooth_matmuls(model, ranges: dict, alpha: float) -> int:
    """SmoothQuant, in place: ``X @ W`` becomes ``(X * 1/s) @ (s[:, None] * W)``; returns how many MatMuls.

    ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)`` per input channel ``k``; MatMuls that read the same
    activation share one Mul (and one ``s``, from the largest weight row over all of them).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    groups: dict = {}
    for node in _weight_matmuls(model):
        groups.setdefault(node.input[0], []).append(node)
    new_nodes, count = {}, 0
    for x, nodes in groups.items():
        ws = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in nodes}
        wmax = np.max([np.abs(w).max(axis=1) for w in ws.values()], axis=0)
        s = np.power(np.maximum(ranges[x], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, None).astype(np.float32)
        for name, w in ws.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        inv, out = f"{x}_smooth_inv", f"{x}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inv))
        new_nodes[x] = onnx.helper.make_node("Mul", [x, inv], [out], f"{x}_smooth")
        for n in nodes:
            n.input[0] = out
            count += 1
    # insert each Mul right before the first MatMul that reads it (the graph stays topologically sorted)
    order = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[0].endswith("_smoothed"):
            src = node.input[0][: -len("_smoothed")]
            if src in new_nodes:
                order.append(new_nodes.pop(src))
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return count


def _weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D constant (the weight MatMuls)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


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
