"""TensorRT engines of the shared backbone (DESIGN.md, "Runtimes").

The engine is built from the backbone ONNX wrapped with a Gather by ``task_index`` from resident norm
tables, so on a GPU the tables stay on the device and only indices travel::

    task_index (B,) int64 ─┐
    norm_table_weight (T, N_norm, D) ── Gather(axis 0) ──► norm_weight (B, N_norm, D) ─┐
    norm_table_bias   (T, N_norm, D) ── Gather(axis 0) ──► norm_bias   (B, N_norm, D) ─┼─► backbone ──► last_hidden
    hidden (B, L, D), attention_mask (B, L) ───────────────────────────────────────────┘

The tables are engine inputs, not weights, so adding a task (up to ``max_tasks``) needs no rebuild.

Reduced precision. TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``,
``OBEY_PRECISION_CONSTRAINTS``, per-layer precision hints); every network is strongly typed and the
precision lives in the graph. So ``fp16`` rewrites the ONNX itself (``convert_to_mixed_precision``):
MatMul/Gemm run in fp16, everything else, normalisation, softmax and residual sums included, stays
fp32. The network is then built strongly typed, which TensorRT 10.x (with the creation flag) and 11.x
honour alike, and the build checks that every normalisation layer TensorRT made computes in fp32.

What runs without TensorRT: the operator check, the task-index wrapper and the mixed-precision rewrite
(all plain ONNX, checked with ONNX Runtime on CPU). The build itself needs ``tensorrt`` and a CUDA GPU;
elsewhere it raises ``RuntimeUnavailableError``.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpt_deploy.artifacts import (
    BACKBONE_INPUTS,
    BACKBONE_OUTPUT,
    NORM_TABLE_INPUTS,
    TASK_INDEX_INPUT,
    BackboneArtifact,
    Repository,
    backbone_dir,
    open_repository,
    repository_lock,
    sha256_file,
)
from fpt_deploy.atomic import write_bytes, write_with
from fpt_deploy.errors import (
    ArtifactError,
    ConfigError,
    ExportMismatchError,
    FptDeployError,
    RuntimeUnavailableError,
    collect,
)

log = logging.getLogger(__name__)

# ONNX operators the TensorRT ONNX parser supports (the "Y" rows of onnx-tensorrt's docs/operators.md
# for TensorRT 10.15, "opset 9 to opset 24"). Rows marked "N" there (Bernoulli, BitShift, Bitwise*,
# Col2Im, Compress, ConvInteger, DFT, Det, DynamicQuantizeLinear, MatMulInteger, Optional*, QLinear*,
# Sequence*, String*, Unique, ...) are absent on purpose.
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
    and agrees bit for bit with the plain graph fed the gathered rows (DESIGN.md).
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
    onnx.checker.check_model(wrapped)
    return wrapped


def convert_to_mixed_precision(model):
    """``model`` with MatMul/Gemm computed in fp16 and every other operator (normalisation too) in fp32.

    Float initializers feeding those operators are stored in fp16; other inputs get a Cast to fp16 and
    each result a Cast back to fp32, so graph inputs and outputs keep their fp32 types. This is the
    strong-typing form of "fp16 with normalisation in fp32" that TensorRT 10.x and 11.x both build.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
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
    out = onnx.shape_inference.infer_shapes(inferred)
    onnx.checker.check_model(out)
    log.info(
        "mixed precision: %d MatMul/Gemm in fp16 (%d Casts added), the rest in fp32",
        converted,
        len(g.node) - len(model.graph.node),
    )
    return out


# --- the engine build (needs tensorrt and a GPU) -----------------------------------------------------


@dataclass
class EngineConfig:
    """What ``build_trt_engine`` builds; validated at once (every problem in one error)."""

    repo: Path  # the deployment repository holding the backbone ONNX
    fp16: bool = False  # MatMul/Gemm in fp16, normalisation in fp32 (``convert_to_mixed_precision``)
    max_batch: int = 64  # profile upper bound on B (rows of one call)
    max_len: int = 512  # profile upper bound on L (tokens a row)
    max_tasks: int = 16  # profile upper bound on T (rows of the resident norm tables)
    opt_batch: int | None = None  # the B TensorRT tunes kernels for; default max_batch
    opt_len: int | None = None  # the L TensorRT tunes kernels for; default max_len
    fingerprint: str | None = None  # which backbone of the repository; default its only one
    workspace_gib: float = 4.0  # builder scratch memory limit
    atol: float | None = None  # parity tolerance vs ONNX Runtime; default 1e-3 (fp32), 5e-2 (fp16)

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        self.opt_batch = self.max_batch if self.opt_batch is None else self.opt_batch
        self.opt_len = self.max_len if self.opt_len is None else self.opt_len
        self.atol = (5e-2 if self.fp16 else 1e-3) if self.atol is None else self.atol
        problems = [
            f"{name} must be >= 1 (got {value})"
            for name, value in (("max-batch", self.max_batch), ("max-len", self.max_len), ("max-tasks", self.max_tasks))
            if value < 1
        ]
        if not 1 <= self.opt_batch <= self.max_batch:
            problems.append(f"opt-batch must be in 1..max-batch={self.max_batch} (got {self.opt_batch})")
        if not 1 <= self.opt_len <= self.max_len:
            problems.append(f"opt-len must be in 1..max-len={self.max_len} (got {self.opt_len})")
        if not self.workspace_gib > 0:
            problems.append(f"workspace must be > 0 GiB (got {self.workspace_gib})")
        if not self.atol > 0:
            problems.append(f"atol must be > 0 (got {self.atol})")
        collect(problems, ConfigError)

    @property
    def variant(self) -> str:
        """The backbone variant name the engine is recorded under."""
        return "trt-fp16" if self.fp16 else "trt-fp32"


@dataclass
class EngineResult:
    path: Path  # the .plan file
    variant: str  # manifest variant ("trt-fp32" | "trt-fp16")
    fingerprint: str
    tasks: list[str]  # the task order of the norm tables used for the parity check
    max_abs_diff: float  # engine vs ONNX Runtime on the wrapped graph
    seconds: float  # build time
    info: dict = field(default_factory=dict)  # what the manifest records


def require_tensorrt():
    """The ``tensorrt`` module, after checking that it is installed and a CUDA GPU is visible."""
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeUnavailableError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install 'fpt-deploy[gpu]'` "
            "(TensorRT 10.x or 11.x), then run `fpt-deploy build-engine` again"
        )
    try:
        import torch
    except ImportError as e:
        raise RuntimeUnavailableError(
            "building a TensorRT engine needs torch (for CUDA buffers): `pip install 'fpt-deploy[train]'`"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            "TensorRT needs a CUDA GPU and none is visible here; build the engine on "
            "the machine (same GPU model) that will serve it"
        )
    import tensorrt as trt

    return trt


def _pick_backbone(repo: Repository, fingerprint: str | None) -> BackboneArtifact:
    if not repo.backbones:
        raise ArtifactError(f"{repo.root} holds no backbone; run `fpt-deploy export` first")
    if fingerprint is None:
        if len(repo.backbones) > 1:
            raise ConfigError(
                f"{repo.root} holds several backbones ({', '.join(fp[:16] for fp in repo.backbones)}); say which one"
            )
        return next(iter(repo.backbones.values()))
    matches = [b for fp, b in repo.backbones.items() if fp.startswith(fingerprint)]
    if len(matches) != 1:
        raise ConfigError(f"fingerprint {fingerprint!r} matches {len(matches)} backbones of {repo.root}")
    return matches[0]


def _norm_tables(repo: Repository, backbone: BackboneArtifact, max_tasks: int):
    """The norm tables (T, N_norm, D) of the repository's tasks on ``backbone``, in name order."""
    tasks = sorted(name for name, t in repo.tasks.items() if t.fingerprint == backbone.fingerprint)
    if len(tasks) > max_tasks:
        raise ConfigError(f"{repo.root} has {len(tasks)} tasks on this backbone, more than max-tasks={max_tasks}")
    if not tasks:
        raise ArtifactError(
            f"{repo.root} has no task on backbone {backbone.fingerprint[:16]}; export one first "
            "(its norm parameters are needed to check the engine)"
        )
    weights, biases = zip(*(repo.tasks[name].load_norms(repo.root) for name in tasks), strict=True)
    return tasks, np.stack(weights), np.stack(biases)


class _LogToLogging:
    """A TensorRT ILogger that forwards to ``logging`` (library code never prints)."""

    @staticmethod
    def make(trt):
        levels = {
            trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
            trt.ILogger.Severity.ERROR: logging.ERROR,
            trt.ILogger.Severity.WARNING: logging.WARNING,
            trt.ILogger.Severity.INFO: logging.DEBUG,
            trt.ILogger.Severity.VERBOSE: logging.DEBUG,
        }

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:
                log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

        return Logger()


def _profile_shapes(config: EngineConfig, num_norms: int, hidden: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every engine input: B, L and T are dynamic."""
    b_opt, b_max, l_opt, l_max = config.opt_batch, config.max_batch, config.opt_len, config.max_len
    table = ((1, num_norms, hidden), (config.max_tasks, num_norms, hidden), (config.max_tasks, num_norms, hidden))
    return {
        "hidden": ((1, 1, hidden), (b_opt, l_opt, hidden), (b_max, l_max, hidden)),
        "attention_mask": ((1, 1), (b_opt, l_opt), (b_max, l_max)),
        TASK_INDEX_INPUT: ((1,), (b_opt,), (b_max,)),
        **{name: table for name in NORM_TABLE_INPUTS},
    }


def _build_serialized(trt, onnx_path: Path, config: EngineConfig, shapes: dict) -> bytes:
    logger = _LogToLogging.make(trt)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TensorRT 10; strong typing makes the graph's own types
    # (fp32 normalisation, fp16 MatMul under --fp16) binding. In 11.x the flag is accepted and implied.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedOperatorError(f"TensorRT's ONNX parser rejected the backbone: {errors}")
    _check_normalisation_fp32(trt, network)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):  # fp32 means fp32: no TF32 tensor-core rounding in the parity check
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(shapes):
        raise ArtifactError(f"the wrapped backbone has inputs {sorted(inputs)}, expected {sorted(shapes)}")
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeUnavailableError(
            "TensorRT could not build the engine (see the TensorRT errors logged above); "
            "try a smaller --max-batch/--max-len or more workspace"
        )
    return bytes(serialized)


def _check_normalisation_fp32(trt, network) -> None:
    """Every normalisation layer of the parsed network must compute in fp32 (DESIGN.md, "Runtimes")."""
    wrong = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            dtypes = {layer.get_input(k).dtype for k in range(layer.num_inputs) if layer.get_input(k) is not None}
            dtypes.add(layer.get_output(0).dtype)
            if dtypes != {trt.float32}:
                wrong.append(f"{layer.name} ({', '.join(sorted(str(d) for d in dtypes))})")
    if wrong:
        raise ExportMismatchError(f"normalisation layers not in fp32: {', '.join(wrong)}")


def _parity_inputs(tasks_w: np.ndarray, tasks_b: np.ndarray, config: EngineConfig, hidden: int, seed: int = 0):
    """A batch that mixes every task, with padded rows, inside the engine's profile."""
    rng = np.random.default_rng(seed)
    B, L = min(config.max_batch, max(4, len(tasks_w))), min(config.max_len, 16)
    mask = np.ones((B, L), np.int64)
    for r in range(1, B, 2):  # every other row padded: real tokens are a prefix
        mask[r, max(1, L - r) :] = 0
    return {
        "hidden": rng.standard_normal((B, L, hidden)).astype(np.float32),
        "attention_mask": mask,
        TASK_INDEX_INPUT: (np.arange(B) % len(tasks_w)).astype(np.int64),
        NORM_TABLE_INPUTS[0]: tasks_w.astype(np.float32),
        NORM_TABLE_INPUTS[1]: tasks_b.astype(np.float32),
    }


def run_trt_engine(trt, engine_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run a serialized engine once on ``feeds`` (host arrays) and return ``last_hidden`` on the host."""
    import torch

    runtime = trt.Runtime(_LogToLogging.make(trt))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ArtifactError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    keep = []  # device buffers must outlive the launch
    for name, array in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        keep.append(tensor)
        context.set_input_shape(name, tuple(array.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    shape = tuple(context.get_tensor_shape(BACKBONE_OUTPUT))
    dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(BACKBONE_OUTPUT)))).dtype
    out = torch.empty(shape, dtype=dtype, device="cuda")
    context.set_tensor_address(BACKBONE_OUTPUT, out.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeUnavailableError("TensorRT failed to run the engine (see the TensorRT errors logged above)")
    stream.synchronize()
    return out.float().cpu().numpy()


def build_trt_engine(config: EngineConfig) -> EngineResult:
    """Build, check and record a TensorRT engine of the repository's backbone, wrapped with the task-index Gather.

    Steps: check the ONNX operators against TensorRT's parser, wrap, (fp16: rewrite to mixed precision),
    build with optimisation profiles over B, L and T, compare the engine with ONNX Runtime on the
    wrapped fp32 graph over a batch mixing every task, then write ``backbone.<variant>.plan`` and the
    wrapped ONNX atomically and record both in the manifest (with the task order of the tables).
    """
    import onnx
    import onnxruntime as ort

    repo = open_repository(config.repo)
    backbone = _pick_backbone(repo, config.fingerprint)
    tasks, table_w, table_b = _norm_tables(repo, backbone, config.max_tasks)
    plain = onnx.load(str(backbone.path(repo.root)))
    if [i.name for i in plain.graph.input] != list(BACKBONE_INPUTS):
        raise ArtifactError(
            f"backbone {backbone.fingerprint[:16]} has inputs {[i.name for i in plain.graph.input]}, "
            f"not {list(BACKBONE_INPUTS)}; re-run `fpt-deploy export`"
        )
    check_tensorrt_ops(plain, "backbone")
    wrapped = wrap_with_task_index(plain)
    to_build = convert_to_mixed_precision(wrapped) if config.fp16 else wrapped
    check_tensorrt_ops(to_build, "wrapped backbone")
    trt = require_tensorrt()

    shapes = _profile_shapes(config, backbone.num_norms, backbone.hidden_size)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fpt-trt-") as tmp:
        onnx_path = Path(tmp) / "backbone.onnx"
        onnx.save(to_build, str(onnx_path), save_as_external_data=to_build.ByteSize() > (1 << 30))
        log.info(
            "building a TensorRT %s engine of %s (B<=%d, L<=%d, T<=%d) ...",
            trt.__version__,
            config.variant,
            config.max_batch,
            config.max_len,
            config.max_tasks,
        )
        engine_bytes = _build_serialized(trt, onnx_path, config, shapes)
    seconds = time.perf_counter() - start

    feeds = _parity_inputs(table_w, table_b, config, backbone.hidden_size)
    session = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([BACKBONE_OUTPUT], feeds)[0]
    got = run_trt_engine(trt, engine_bytes, feeds)
    diff = float(np.max(np.abs(got - expected)))
    log.info(
        "TensorRT vs ONNX Runtime on a %d-row batch mixing %d tasks: max abs diff %.3g (atol %.1g)",
        feeds["hidden"].shape[0],
        len(tasks),
        diff,
        config.atol,
    )
    if not diff <= config.atol:
        raise ExportMismatchError(
            f"the TensorRT engine differs from ONNX Runtime by {diff:.3g} (> atol {config.atol}); not recording it"
        )

    import torch

    folder = backbone_dir(backbone.fingerprint)
    plan_rel, wrapped_rel = f"{folder}/backbone.{config.variant}.plan", f"{folder}/backbone.task-index.onnx"
    write_bytes(repo.root / plan_rel, engine_bytes)
    write_with(repo.root / wrapped_rel, lambda tmp: onnx.save(wrapped, str(tmp)))
    info = {
        "file": plan_rel,
        "onnx": wrapped_rel,
        "tasks": tasks,  # row t of the norm tables is tasks[t]; new tasks append (up to max_tasks)
        "precision": "fp16 MatMul/Gemm, fp32 elsewhere" if config.fp16 else "fp32",
        "profile": {
            name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in shapes.items()
        },
        "max_batch": config.max_batch,
        "max_len": config.max_len,
        "max_tasks": config.max_tasks,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
        "max_abs_diff_vs_onnxruntime": diff,
    }
    # Re-read the manifest under the repository's lock, so a concurrent export's additions are kept.
    with repository_lock(config.repo):
        repo = open_repository(config.repo)
        entry = repo.backbones[backbone.fingerprint]
        for variant, rel in ((config.variant, plan_rel), ("task-index", wrapped_rel)):
            entry.files[variant], entry.sha256[variant] = rel, sha256_file(repo.root / rel)
        entry.extra.setdefault("engines", {})[config.variant] = info
        repo.save_manifest()
    log.info("wrote %s (%.1f MB) in %.0fs", plan_rel, len(engine_bytes) / 1e6, seconds)
    return EngineResult(repo.root / plan_rel, config.variant, backbone.fingerprint, tasks, diff, seconds, info)
