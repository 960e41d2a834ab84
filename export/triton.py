"""A Triton Inference Server model repository from a deployment repository (docs/architecture.md).

Layout written (``<fp16>`` is the first 16 hex digits of the backbone fingerprint)::

    fpt_backbone_<fp16>/config.pbtxt   platform onnxruntime_onnx, dynamic_batching: ONE shared body
    fpt_backbone_<fp16>/1/model.onnx   the backbone ONNX as exported (per-row norm inputs)
    <task>_input/1/model.onnx          the task's input head, which ALSO emits its norm rows (B, N_norm, D)
    <task>_output/1/model.onnx         the task's output head
    <task>_output/labels.txt           class names, one a line: the ``label_filename`` of its logits
    <task>/config.pbtxt                an ensemble: <task>_input -> fpt_backbone_<fp16> -> <task>_output
    <task>/1/                          (empty: Triton wants a version folder for ensembles too)
    <task>/labels.txt                  the same names, so ``class_count`` asked of the ensemble names them

Because every backbone input is batched along dim 0 and each row carries its own task's norm rows,
Triton's dynamic batcher on the backbone model merges requests of different tasks into one execution
(rows of equal sequence length: the batcher only concatenates requests whose other dims match).

The input head's norm outputs are made by editing the exported ``input.onnx`` with the ONNX helper API:
the task's (N_norm, D) norms become initializers, expanded to (B, N_norm, D) with B taken from the
head's own ``hidden`` output. Torch-free: built from the deployment repository alone.

GPUs (``backend="tensorrt"``, ``export --format triton --backend tensorrt``): every model gets a
``KIND_GPU`` instance group, and the backbone stays an ``onnxruntime_onnx`` model with ONNX Runtime's
TensorRT execution accelerator, not a ``tensorrt_plan``. A TensorRT plan runs only under the exact
TensorRT version and GPU model that built it, and Triton's container carries its own TensorRT, so a plan
made by ``fpt-deploy build-engine`` (pip's TensorRT, possibly another GPU) would generally not load there.
With the accelerator, Triton's own TensorRT builds the engine on the serving GPU at model load, for the
optimisation profile written into the config, caches it on disk for the next load, and leaves any node
TensorRT cannot take to the CUDA provider. It keeps the per-row norm inputs, so the dynamic batcher still
merges requests of different tasks into one backbone execution.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fpt_deploy.artifacts import (
    BACKBONE_INPUTS,
    BACKBONE_OUTPUT,
    INPUT_HEAD_OUTPUTS,
    OUTPUT_HEAD_INPUTS,
    OUTPUT_HEAD_OUTPUT,
    BackboneArtifact,
    Repository,
    TaskArtifact,
    open_repository,
    verify_file,
)
from fpt_deploy.atomic import replace_dir
from fpt_deploy.errors import ArtifactError, ConfigError, collect

log = logging.getLogger(__name__)

NORM_OUTPUTS = ("norm_weight", "norm_bias")  # what the Triton input head adds to INPUT_HEAD_OUTPUTS
BACKBONE_MODEL_PREFIX = "fpt_backbone_"

# ONNX TensorProto element type -> Triton's DataType name (model_config.proto).
_TRITON_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}  # fmt: skip


@dataclass(kw_only=True)
class TritonConfig:
    """``export --format triton``: what ``write_triton_repository`` writes; validated at once."""

    repo: Path = field(metadata={"help": "The deployment repository (`fpt-deploy export` output)."})
    out: Path | None = field(default=None, metadata={"help": "The Triton model repository (default REPO/triton)."})
    backend: Literal["onnxruntime", "tensorrt"] = field(
        default="onnxruntime",
        metadata={
            "help": "onnxruntime: ONNX Runtime on Triton's default devices; tensorrt: GPU instances, the backbone "
            "through ONNX Runtime's TensorRT accelerator (engine built on the serving GPU at load, cached)."
        },
    )
    max_batch_size: int = field(default=64, metadata={"help": "Rows of one backbone execution (and of each head)."})
    max_len: int = field(
        default=512, metadata={"help": "Longest sequence the TensorRT profile admits (--backend tensorrt)."}
    )
    max_queue_delay_us: int = field(
        default=2000, metadata={"help": "How long the backbone's batcher waits to fill a batch (microseconds)."}
    )
    preferred_batch_size: tuple[int, ...] = field(
        default=(), metadata={"help": "Batch sizes the backbone's batcher aims for."}
    )
    instance_kind: Literal["KIND_AUTO", "KIND_GPU", "KIND_CPU"] | None = field(
        default=None, metadata={"help": "Instance kind of every model (default: KIND_GPU for tensorrt, else AUTO)."}
    )
    instances: int = field(default=1, metadata={"help": "Backbone instances (of instance_kind)."})
    tasks: tuple[str, ...] | None = field(default=None, metadata={"help": "Tasks to serve (default: every task)."})

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        self.out = Path(self.out) if self.out else self.repo / "triton"
        self.preferred_batch_size = tuple(self.preferred_batch_size)
        if self.instance_kind is None:
            self.instance_kind = "KIND_GPU" if self.backend == "tensorrt" else "KIND_AUTO"
        problems = []
        if self.backend not in ("onnxruntime", "tensorrt"):
            problems.append(f"backend must be onnxruntime or tensorrt (got {self.backend!r})")
        if self.max_len < 1:
            problems.append(f"max len must be >= 1 (got {self.max_len})")
        if self.max_batch_size < 1:
            problems.append(f"max batch size must be >= 1 (got {self.max_batch_size})")
        if self.max_queue_delay_us < 0:
            problems.append(f"max queue delay must be >= 0 microseconds (got {self.max_queue_delay_us})")
        bad = [b for b in self.preferred_batch_size if not 1 <= b <= self.max_batch_size]
        if bad:
            problems.append(f"preferred batch sizes must be in 1..{self.max_batch_size} (got {bad})")
        if self.instance_kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
            problems.append(f"instance kind must be KIND_AUTO, KIND_GPU or KIND_CPU (got {self.instance_kind!r})")
        if self.instances < 1:
            problems.append(f"instances must be >= 1 (got {self.instances})")
        if self.out.resolve() == self.repo.resolve():
            problems.append("the Triton repository must not be the deployment repository itself")
        collect(problems, ConfigError)


@dataclass
class TritonResult:
    out: Path
    backbones: list[str]  # Triton model names of the backbones
    tasks: list[str]  # ensemble (= task) names


# --- config.pbtxt text ---------------------------------------------------------------------------------


LABELS_FILE = "labels.txt"


def _tensors_pbtxt(kind: str, tensors: list[tuple[str, str, list[int]]], labelled: str = "") -> str:
    """A config's ``input``/``output`` list; the tensor named ``labelled`` gets ``label_filename``."""
    items = ",\n".join(
        f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]'
        + (f' label_filename: "{LABELS_FILE}"' if name == labelled else "")
        + " }"
        for name, dtype, dims in tensors
    )
    return f"{kind} [\n{items}\n]\n"


def _model_pbtxt(name: str, io: dict, max_batch_size: int, batching: str, extra: str = "", labelled: str = "") -> str:
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        + _tensors_pbtxt("input", io["inputs"])
        + _tensors_pbtxt("output", io["outputs"], labelled)
        + batching
        + extra
    )


def _instances(config: TritonConfig, count: int = 1) -> str:
    return f"instance_group [ {{ count: {count} kind: {config.instance_kind} }} ]\n"


def _tensorrt_accelerator(config: TritonConfig, io: dict) -> str:
    """ONNX Runtime's TensorRT accelerator with one optimisation profile over (B, L) and an engine cache.

    Profile shapes follow ``build-engine``: min 1 row of 1 token, tuned for half the rows and a quarter
    of the tokens, max ``max_batch_size`` rows of ``max_len`` tokens; fixed dims are taken from the graph.
    """

    def shapes(rows: int, tokens: int) -> str:
        def one(dims: list[int]) -> str:
            return "x".join(str(d if d > 0 else tokens) for d in (rows, *dims))

        return ",".join(f"{name}:{one(dims)}" for name, _, dims in io["inputs"])

    b, t = config.max_batch_size, config.max_len
    parameters = {
        "trt_engine_cache_enable": "1",  # the engine is built once per GPU, then loaded from the cache
        "trt_engine_cache_path": "/tmp/fpt_deploy_trt_cache",
        "max_workspace_size_bytes": str(4 << 30),
        "trt_profile_min_shapes": shapes(1, 1),
        "trt_profile_opt_shapes": shapes(max(1, b // 2), max(1, t // 4)),
        "trt_profile_max_shapes": shapes(b, t),
    }
    listed = "".join(f'      parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in parameters.items())
    return (
        "optimization { execution_accelerators {\n  gpu_execution_accelerator : [ {\n"
        f'      name : "tensorrt"\n{listed}  }} ]\n}}}}\n'
    )


def _ensemble_pbtxt(
    name: str, max_batch_size: int, inputs, outputs, steps: list[tuple[str, dict, dict]], labelled: str = ""
) -> str:
    def maps(kind: str, mapping: dict) -> str:
        return "".join(f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in mapping.items())

    body = (
        "".join(
            f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps("input_map", i)}'
            f"{maps('output_map', o)}    }},\n"
            for model, i, o in steps
        ).rstrip(",\n")
        + "\n"
    )
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        + _tensors_pbtxt("input", inputs)
        + _tensors_pbtxt("output", outputs, labelled)
        + f"ensemble_scheduling {{\n  step [\n{body}  ]\n}}\n"
    )


def _dynamic_batching(config: TritonConfig) -> str:
    preferred = (
        f"  preferred_batch_size: [ {', '.join(map(str, config.preferred_batch_size))} ]\n"
        if config.preferred_batch_size
        else ""
    )
    return f"dynamic_batching {{\n{preferred}  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}\n"


# --- graphs --------------------------------------------------------------------------------------------


def onnx_io(model) -> dict[str, list[tuple[str, str, list[int]]]]:
    """A graph's inputs and outputs as Triton sees them: (name, TYPE_*, dims without the batch dim; -1 = dynamic)."""

    def describe(values) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _TRITON_TYPES:
                raise ArtifactError(f"graph tensor {v.name!r} has ONNX type {t.elem_type}, which Triton cannot carry")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
            if not dims:
                raise ArtifactError(f"graph tensor {v.name!r} has no batch dimension; Triton batching needs one")
            out.append((v.name, _TRITON_TYPES[t.elem_type], dims[1:]))
        return out

    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": describe(i for i in model.graph.input if i.name not in initializers),
        "outputs": describe(model.graph.output),
    }


def add_norm_outputs(input_head, norm_weight: np.ndarray, norm_bias: np.ndarray):
    """The input head with two more outputs: the task's norm rows broadcast to the batch, (B, N_norm, D) each.

    The (N_norm, D) tables become initializers; B is read from the head's ``hidden`` output, so the new
    outputs always match the batch the head was called with.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = input_head.graph
    outputs = [o.name for o in g.output]
    if outputs != list(INPUT_HEAD_OUTPUTS):
        raise ArtifactError(f"the input head has outputs {outputs}, expected {list(INPUT_HEAD_OUTPUTS)}")
    if norm_weight.shape != norm_bias.shape or norm_weight.ndim != 2:
        raise ArtifactError(f"norm tables have shapes {norm_weight.shape} and {norm_bias.shape}; expected (N_norm, D)")
    model = onnx.ModelProto()
    model.CopyFrom(input_head)
    g, p = model.graph, "fpt_norms/"  # a prefix no exporter uses, so no name clashes
    n_norm, d = norm_weight.shape
    g.initializer.extend([
        numpy_helper.from_array(norm_weight.astype(np.float32), f"{p}weight"),
        numpy_helper.from_array(norm_bias.astype(np.float32), f"{p}bias"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}zero"),
        numpy_helper.from_array(np.array([n_norm, d], np.int64), f"{p}rows"),
    ])  # fmt: skip
    g.node.extend([
        helper.make_node("Shape", [INPUT_HEAD_OUTPUTS[0]], [f"{p}hidden_shape"], name=f"{p}shape"),
        helper.make_node("Gather", [f"{p}hidden_shape", f"{p}zero"], [f"{p}batch"], axis=0, name=f"{p}batch"),
        helper.make_node("Concat", [f"{p}batch", f"{p}rows"], [f"{p}target"], axis=0, name=f"{p}target"),
        helper.make_node("Expand", [f"{p}weight", f"{p}target"], [NORM_OUTPUTS[0]], name=f"{p}expand_weight"),
        helper.make_node("Expand", [f"{p}bias", f"{p}target"], [NORM_OUTPUTS[1]], name=f"{p}expand_bias"),
    ])  # fmt: skip
    g.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", n_norm, d]) for name in NORM_OUTPUTS)
    onnx.checker.check_model(model)
    return model


def _external_data_files(model) -> list[str]:
    """The files (relative to the graph) holding a graph's externally stored initializers."""
    from onnx import TensorProto

    files = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return sorted(files)


def backbone_model_name(fingerprint: str) -> str:
    return f"{BACKBONE_MODEL_PREFIX}{fingerprint[:16]}"


def _write_backbone(root: Path, repo: Repository, backbone: BackboneArtifact, config: TritonConfig) -> str:
    import onnx

    name = backbone_model_name(backbone.fingerprint)
    src = backbone.path(repo.root)
    graph = onnx.load(str(src), load_external_data=False)
    io = onnx_io(graph)
    names = ([n for n, _, _ in io["inputs"]], [n for n, _, _ in io["outputs"]])
    if names != (list(BACKBONE_INPUTS), [BACKBONE_OUTPUT]):
        raise ArtifactError(f"{src} has inputs/outputs {names}, not the backbone contract; re-run `fpt-deploy export`")
    (root / name / "1").mkdir(parents=True)
    shutil.copyfile(src, root / name / "1" / "model.onnx")
    for rel in _external_data_files(graph):  # weights stored beside the graph travel with it
        shutil.copyfile(src.parent / rel, root / name / "1" / rel)
    extra = _instances(config, config.instances)
    if config.backend == "tensorrt":
        extra += _tensorrt_accelerator(config, io)
    (root / name / "config.pbtxt").write_text(
        _model_pbtxt(name, io, config.max_batch_size, _dynamic_batching(config), extra)
    )
    return name


def _write_task(root: Path, repo: Repository, task: TaskArtifact, backbone_name: str, config: TritonConfig) -> None:
    import onnx

    head_in, head_out = f"{task.name}_input", f"{task.name}_output"
    norm_weight, norm_bias = task.load_norms(repo.root)
    backbone = repo.backbone_for(task.name)
    if norm_weight.shape != (backbone.num_norms, backbone.hidden_size):
        raise ArtifactError(
            f"task {task.name!r} has norms of shape {norm_weight.shape}, but its backbone needs "
            f"({backbone.num_norms}, {backbone.hidden_size}); re-run `fpt-deploy export`"
        )
    input_head = onnx.load(str(verify_file(repo.root, task.files["input"], task.sha256["input"])))
    output_head = onnx.load(str(verify_file(repo.root, task.files["output"], task.sha256["output"])))
    input_head = add_norm_outputs(input_head, norm_weight, norm_bias)
    batching = _dynamic_batching(config)
    labels = "".join(f"{label}\n" for label in task.labels)
    for name, model in ((head_in, input_head), (head_out, output_head)):
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        labelled = OUTPUT_HEAD_OUTPUT if name == head_out and labels else ""
        if labelled:
            (root / name / LABELS_FILE).write_text(labels)
        (root / name / "config.pbtxt").write_text(
            _model_pbtxt(name, onnx_io(model), config.max_batch_size, batching, _instances(config), labelled)
        )

    in_io, out_io = onnx_io(input_head), onnx_io(output_head)
    # Ensemble tensors are named like the graph tensors they carry; the mask feeds both later steps.
    steps = [
        (head_in, {n: n for n, _, _ in in_io["inputs"]}, {n: n for n, _, _ in in_io["outputs"]}),
        (backbone_name, {n: n for n in BACKBONE_INPUTS}, {BACKBONE_OUTPUT: BACKBONE_OUTPUT}),
        (head_out, {n: n for n in OUTPUT_HEAD_INPUTS}, {OUTPUT_HEAD_OUTPUT: OUTPUT_HEAD_OUTPUT}),
    ]
    outputs = [t for t in out_io["outputs"] if t[0] == OUTPUT_HEAD_OUTPUT]
    (root / task.name / "1").mkdir(parents=True)
    if labels:
        (root / task.name / LABELS_FILE).write_text(labels)
    (root / task.name / "config.pbtxt").write_text(
        _ensemble_pbtxt(
            task.name, config.max_batch_size, in_io["inputs"], outputs, steps, OUTPUT_HEAD_OUTPUT if labels else ""
        )
    )


def write_triton_repository(config: TritonConfig) -> TritonResult:
    """Write (atomically, as a whole folder) a Triton model repository serving the tasks of ``config.repo``.

    One ``onnxruntime_onnx`` model per backbone, with dynamic batching; per task an input head that
    also emits its norm rows, an output head, and an ensemble named like the task chaining the three.
    """
    repo = open_repository(config.repo)
    names = list(config.tasks) if config.tasks is not None else sorted(repo.tasks)
    if not names:
        raise ArtifactError(f"{repo.root} has no task to serve; run `fpt-deploy export --task ...` first")
    tasks = [repo.task(n) for n in names]  # UnknownNameError for a task the repository lacks
    clash = [n for n in names if n.startswith(BACKBONE_MODEL_PREFIX) or n.endswith(("_input", "_output"))]
    if clash:
        raise ConfigError(f"task names {clash} would collide with Triton model names of this layout")
    backbones: dict[str, str] = {}

    def fill(root: Path) -> None:
        for task in tasks:
            backbone = repo.backbone_for(task.name)
            if backbone.fingerprint not in backbones:
                backbones[backbone.fingerprint] = _write_backbone(root, repo, backbone, config)
            _write_task(root, repo, task, backbones[backbone.fingerprint], config)

    replace_dir(config.out, fill)
    log.info(
        "wrote a Triton model repository to %s: %d backbone(s), tasks %s", config.out, len(backbones), ", ".join(names)
    )
    return TritonResult(config.out, sorted(backbones.values()), names)
