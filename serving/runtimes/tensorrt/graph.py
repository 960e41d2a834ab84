"""The ONNX side of TensorRT engines: operator check, task-index wrapper, fp16 rewrite. Plain ONNX, no GPU.

``fpt-deploy build-engine`` (``fpt_deploy.serving.runtimes.tensorrt.build``) builds its engine from the
repository's portable ``backbone.onnx`` after three graph steps that run anywhere (checked with ONNX
Runtime on CPU in the tests):

1. ``check_tensorrt_ops``: every operator and the opset are ones TensorRT's ONNX parser reads;
2. ``wrap_with_task_index``: the backbone gathers each row's norm parameters by ``task_index`` from
   resident tables, so on a GPU the tables stay on the device and only indices travel::

    task_index (B,) int64 ─┐
    norm_table_weight (T, N_norm, D) ── Gather(axis 0) ──► norm_weight (B, N_norm, D) ─┐
    norm_table_bias   (T, N_norm, D) ── Gather(axis 0) ──► norm_bias   (B, N_norm, D) ─┼─► backbone ──► last_hidden
    hidden (B, L, D), attention_mask (B, L) ───────────────────────────────────────────┘

   The tables are engine inputs, not weights, so adding a task (up to ``max_tasks``) needs no rebuild.
3. ``convert_to_mixed_precision`` (``--fp16``): TensorRT 11 removed the weak-typing builder flags
   (``BuilderFlag.FP16``, per-layer precision hints); every network is strongly typed and the precision
   lives in the graph. So MatMul/Gemm are rewritten to fp16 in the ONNX itself and everything else,
   normalisation, softmax and residual sums included, stays fp32 (docs/architecture.md, "Runtimes").
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from fpt_deploy.artifacts import NORM_TABLE_INPUTS, TASK_INDEX_INPUT
from fpt_deploy.errors import ArtifactError, FptDeployError
from fpt_deploy.onnx_files import check_model, infer_shapes

log = logging.getLogger(__name__)

# ONNX operators the TensorRT ONNX parser supports: the "Y" rows of onnx-tensorrt's docs/operators.md for
# TensorRT 10.15 ("opset 9 to opset 24"). Older parsers read less (10.0: opsets 9 to 20, no
# RMSNormalization/RotaryEmbedding/TensorScatter), so the [tensorrt] extra requires TensorRT >= 10.15 and
# ``TABLE_TENSORRT_VERSION`` is checked against the installed one before a build. Rows marked "N" there
# (Bernoulli, BitShift, Bitwise*, Col2Im, Compress, ConvInteger, DFT, Det, DynamicQuantizeLinear,
# MatMulInteger, Optional*, QLinear*, Sequence*, String*, Unique, ...) are absent on purpose.
TENSORRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
TENSORRT_OPSET_RANGE = (9, 24)  # the default-domain opsets the same parser accepts
TABLE_TENSORRT_VERSION = (10, 15)  # the TensorRT release the table and the range come from
MIXED_PRECISION_OPS = frozenset({"MatMul", "Gemm"})  # what ``fp16`` moves to half precision


class UnsupportedOperatorError(FptDeployError, ValueError):
    """A graph uses operators (or an opset) that TensorRT's ONNX parser cannot read."""


# --- graph checks and rewrites (plain ONNX: run anywhere) -------------------------------------------


def _copy(message):
    """A detached copy of a protobuf message (so clearing its old container cannot touch it)."""
    twin = type(message)()
    twin.CopyFrom(message)
    return twin


def list_op_types(model) -> Counter:
    """How often each operator occurs in ``model``, subgraphs (If/Loop/Scan) and local functions included.

    Default-domain operators appear by name (``MatMul``); others as ``domain::Op`` (``com.microsoft::Attention``).
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    counts: Counter = Counter()

    def visit(nodes, seen_functions: frozenset) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions and key not in seen_functions:  # a local function: the parser inlines it
                visit(functions[key].node, seen_functions | {key})
                continue
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            counts[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
            for attr in node.attribute:
                if attr.g.node:
                    visit(attr.g.node, seen_functions)
                for g in attr.graphs:
                    visit(g.node, seen_functions)

    visit(model.graph.node, frozenset())
    return counts


def unsupported_tensorrt_ops(model) -> list[str]:
    """The operators of ``model`` that TensorRT's ONNX parser does not support (empty when all are)."""
    return sorted(op for op in list_op_types(model) if op not in TENSORRT_ONNX_OPS)


def check_tensorrt_ops(model, what: str = "graph") -> None:
    """Raise ``UnsupportedOperatorError`` naming every operator or opset TensorRT cannot parse."""
    problems = []
    bad = unsupported_tensorrt_ops(model)
    if bad:
        problems.append(f"operators TensorRT's ONNX parser does not support: {', '.join(bad)}")
    lo, hi = TENSORRT_OPSET_RANGE
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            problems.append(f"default-domain opset {imp.version} is outside TensorRT's range {lo}..{hi}")
    if problems:
        raise UnsupportedOperatorError(
            f"the {what} cannot be built with TensorRT: {'; '.join(problems)}. Export it without ONNX Runtime-only "
            "fusions (com.microsoft operators) and with an opset TensorRT accepts"
        )


def wrap_with_task_index(model):
    """The backbone graph with ``norm_weight``/``norm_bias`` gathered by ``task_index`` from resident tables.

    New inputs: ``task_index`` (B,) int64 and ``norm_table_weight``/``norm_table_bias`` (T, N_norm, D).
    Two Gathers (axis 0) produce tensors named exactly like the old inputs, so the body is untouched
    and agrees bit for bit with the plain graph fed the gathered rows.
    """
    import onnx
    from onnx import TensorProto, helper

    graph_inputs = {i.name: i for i in model.graph.input}
    missing = [n for n in ("norm_weight", "norm_bias") if n not in graph_inputs]
    if missing:
        raise ArtifactError(
            f"the backbone graph has no input {', '.join(missing)}; it is not an fpt-deploy "
            f"backbone (inputs {', '.join(graph_inputs)})"
        )
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    g = wrapped.graph
    taken = {i.name for i in g.input} | {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
    clash = [n for n in (TASK_INDEX_INPUT, *NORM_TABLE_INPUTS) if n in taken]
    if clash:
        raise ArtifactError(f"the backbone graph already has tensors named {', '.join(clash)}; it is already wrapped")

    def table_info(name: str, per_row) -> onnx.ValueInfoProto:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in per_row.type.tensor_type.shape.dim]
        return helper.make_tensor_value_info(name, per_row.type.tensor_type.elem_type, ["T", *dims[1:]])

    new_inputs = [i for i in g.input if i.name not in ("norm_weight", "norm_bias")]
    new_inputs += [
        helper.make_tensor_value_info(TASK_INDEX_INPUT, TensorProto.INT64, ["B"]),
        table_info(NORM_TABLE_INPUTS[0], graph_inputs["norm_weight"]),
        table_info(NORM_TABLE_INPUTS[1], graph_inputs["norm_bias"]),
    ]
    gathers = [
        helper.make_node("Gather", [table, TASK_INDEX_INPUT], [per_row], axis=0, name=f"fpt_gather_{per_row}")
        for table, per_row in zip(NORM_TABLE_INPUTS, ("norm_weight", "norm_bias"), strict=True)
    ]
    nodes = [*gathers, *(_copy(n) for n in g.node)]
    del g.input[:]
    g.input.extend(new_inputs)
    del g.node[:]
    g.node.extend(nodes)
    g.value_info.extend([graph_inputs["norm_weight"], graph_inputs["norm_bias"]])  # keep their known shapes
    check_model(wrapped)  # a graph past 2 GB is checked by path when saved
    return wrapped


def convert_to_mixed_precision(model):
    """``model`` with MatMul/Gemm computed in fp16 and every other operator (normalisation too) in fp32.

    Float initializers feeding those operators are stored in fp16; other inputs get a Cast to fp16 and
    each result a Cast back to fp32, so graph inputs and outputs keep their fp32 types. This is the
    strong-typing form of "fp16 with normalisation in fp32" that TensorRT 10.x and 11.x both build.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inferred = infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    initializers = {i.name: i for i in g.initializer}
    types.update({name: init.data_type for name, init in initializers.items()})

    half_inits: dict[str, onnx.TensorProto] = {}
    casted: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
    nodes, converted = [], 0
    for node in (_copy(n) for n in g.node):
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type not in MIXED_PRECISION_OPS
            or not all(types.get(name) == TensorProto.FLOAT for name in (*node.input, *node.output) if name)
        ):
            nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if not name:
                continue
            if name not in casted:
                casted[name] = f"{name}__fp16"
                if name in initializers:
                    arr = numpy_helper.to_array(initializers[name]).astype(np.float16)
                    half_inits[name] = numpy_helper.from_array(arr, casted[name])
                else:
                    nodes.append(
                        helper.make_node(
                            "Cast", [name], [casted[name]], to=TensorProto.FLOAT16, name=f"{casted[name]}_cast"
                        )
                    )
            node.input[k] = casted[name]
        outputs = list(node.output)
        for k, name in enumerate(outputs):
            node.output[k] = f"{name}__fp16"
        nodes.append(node)
        nodes.extend(
            helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_cast")
            for name in outputs
        )
        converted += 1
    still_used = {name for n in nodes for name in n.input} | {o.name for o in g.output}
    kept = [_copy(init) for init in g.initializer if init.name in still_used]
    del g.initializer[:]
    g.initializer.extend([*kept, *half_inits.values()])
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # stale for renamed tensors; re-inferred below
    out = infer_shapes(inferred)
    check_model(out)
    log.info(
        "mixed precision: %d MatMul/Gemm in fp16 (%d Casts added), the rest in fp32",
        converted,
        len(g.node) - len(model.graph.node),
    )
    return out
