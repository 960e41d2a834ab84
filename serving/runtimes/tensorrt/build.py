"""``fpt-deploy build-engine``: build, check and record a TensorRT engine of a repository's backbone."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig
from fpt_deploy.serving.runtimes.tensorrt.cuda import create_checked, load_gpu_stack, trt_logger
from fpt_deploy.serving.runtimes.tensorrt.graph import (
    UnsupportedOperatorError,
    check_tensorrt_ops,
    convert_to_mixed_precision,
    wrap_with_task_index,
)
from fpt_deploy.serving.runtimes.tensorrt.session import EngineSession

from fpt_deploy.artifacts import (
    BACKBONE_INPUTS,
    BACKBONE_OUTPUT,
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    NORM_TABLE_INPUTS,
    TASK_INDEX_INPUT,
    BackboneArtifact,
    Repository,
    backbone_dir,
    open_repository,
    repository_lock,
    sha256_file,
    verify_file,
)
from fpt_deploy.atomic import write_bytes, write_with
from fpt_deploy.errors import ArtifactError, ConfigError, ExportMismatchError, RuntimeUnavailableError
from fpt_deploy.onnx_files import save_model

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EngineResult:
    path: Path  # the .plan file
    variant: str  # manifest variant ("trt-fp32" | "trt-fp16")
    fingerprint: str
    tasks: list[str]  # the task order of the norm tables used for the parity check
    parity: dict[str, float]  # max |engine - ONNX Runtime| at the profile's min, opt and max shape
    seconds: float  # build time
    info: dict = field(default_factory=dict)  # what the manifest records

    @property
    def max_abs_diff(self) -> float:
        return max(self.parity.values())


def build_serialized(trt, onnx_path: Path, config: EngineConfig, shapes: dict) -> bytes:
    """The serialized engine of the graph at ``onnx_path``, strongly typed, with one profile of ``shapes``."""
    logger = trt_logger(trt)
    builder = create_checked(trt.Builder, "builder", logger)
    # Explicit batch is the only mode since TensorRT 10; strong typing makes the graph's own types
    # (fp32 normalisation, fp16 MatMul under --fp16) binding. In 11.x the flag is accepted and implied.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = create_checked(trt.OnnxParser, "ONNX parser", network, logger)
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
    if builder_config.add_optimization_profile(profile) < 0:  # TensorRT returns -1 for an invalid profile
        raise ConfigError(
            f"TensorRT refused the optimisation profile {shapes} (see the TensorRT errors logged above); "
            "check --max-batch, --max-len, --max-tasks and --opt-batch/--opt-len"
        )
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeUnavailableError(
            "TensorRT could not build the engine (see the TensorRT errors logged above); "
            "try a smaller --max-batch/--max-len or a larger --workspace-gib"
        )
    return bytes(serialized)


def _check_normalisation_fp32(trt, network) -> None:
    """Every normalisation layer of the parsed network must compute in fp32 (docs/architecture.md, "Runtimes")."""
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


def _norm_tables(repo: Repository, backbone: BackboneArtifact, max_tasks: int):
    """The tasks on ``backbone`` in name order, and their norm tables (T, N_norm, D)."""
    tasks = sorted(name for name, t in repo.tasks.items() if t.fingerprint == backbone.fingerprint)
    if not tasks:
        raise ArtifactError(
            f"{repo.root} has no task on backbone {backbone.fingerprint[:16]}; export one first "
            "(its norm parameters and input head are needed to check the engine)"
        )
    if len(tasks) > max_tasks:
        raise ConfigError(
            f"{repo.root} has {len(tasks)} tasks on this backbone, more than --max-tasks {max_tasks}; "
            f"pass --max-tasks {len(tasks)} or more"
        )
    weights, biases = zip(*(repo.tasks[name].load_norms(repo.root) for name in tasks), strict=True)
    return tasks, np.stack(weights), np.stack(biases)


def _raw_example(task, rng, rows: int) -> np.ndarray:
    """``rows`` raw inputs a client could send ``task`` (its declared dtype and shape; token ids, no padding)."""
    shape, dtype = (rows, *(int(s) for s in task.input["shape"][1:])), np.dtype(task.input["dtype"])
    vocab = int(getattr(task.spec, "vocab_size", 0) or 0)
    if vocab:
        return rng.integers(1, vocab, shape).astype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, 0), min(info.max, 255) + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def parity_feeds(repo: Repository, tasks: list[str], tables, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """Engine inputs of ``shape`` (B, L, T): hidden rows from the tasks' own input heads, mixed tasks, padding.

    The hidden states are what the backbone sees in service (each task's input head on raw inputs of
    its declared type), tiled or cut to L tokens; row r belongs to task r mod len(tasks), and every
    other row is padded after a prefix. The T table rows cycle through the real tasks' norms.
    """
    import onnxruntime as ort

    B, L, T = shape
    rng = np.random.default_rng(seed)
    weight, bias = tables
    heads, rows = {}, []
    for r in range(B):
        art = repo.tasks[tasks[r % len(tasks)]]
        if art.name not in heads:
            path = verify_file(repo.root, art.files["input"], art.sha256["input"])
            heads[art.name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        raw = {INPUT_HEAD_INPUT: _raw_example(art, rng, 1)}
        hidden = heads[art.name].run([INPUT_HEAD_OUTPUTS[0]], raw)[0][0]  # (L_task, D)
        rows.append(np.resize(hidden, (L, hidden.shape[1])))  # tiled or cut along the sequence
    mask = np.ones((B, L), np.int64)
    for r in range(1, B, 2):
        mask[r, max(1, L - r) :] = 0  # real tokens are a prefix
    order = [k % len(tasks) for k in range(T)]
    return {
        "hidden": np.stack(rows).astype(np.float32),
        "attention_mask": mask,
        TASK_INDEX_INPUT: (np.arange(B) % min(T, len(tasks))).astype(np.int64),
        NORM_TABLE_INPUTS[0]: weight[order].astype(np.float32),
        NORM_TABLE_INPUTS[1]: bias[order].astype(np.float32),
    }


def check_parity(session: EngineSession, reference, repo, tasks, tables, shapes: dict) -> dict[str, float]:
    """Max |engine - ONNX Runtime| at the min, opt and max shape of the profile (B, L, T of each)."""
    diffs = {}
    for k, point in enumerate(("min", "opt", "max")):
        B, L, _ = shapes["hidden"][k]
        T = shapes[NORM_TABLE_INPUTS[0]][k][0]
        feeds = parity_feeds(repo, tasks, tables, (B, L, T), seed=k)
        expected = reference.run([BACKBONE_OUTPUT], feeds)[0]
        session.set_tables(feeds[NORM_TABLE_INPUTS[0]], feeds[NORM_TABLE_INPUTS[1]])
        got = session.run(feeds["hidden"], feeds["attention_mask"], feeds[TASK_INDEX_INPUT])
        diffs[f"{point} B={B} L={L} T={T}"] = float(np.max(np.abs(got - expected)))
    return diffs


def build_engine(config: EngineConfig) -> EngineResult:
    """Build, check and record a TensorRT engine of the repository's backbone wrapped with the task-index Gather.

    Steps: choose the backbone, check the GPU stack, check the ONNX operators against TensorRT's parser,
    wrap, (fp16: rewrite to mixed precision), build with one profile over B, L and T, compare the engine
    with ONNX Runtime (CPU, the wrapped fp32 graph) at the profile's min, opt and max shapes on hidden
    rows from the tasks' input heads, then write ``backbone.<variant>.plan`` and the wrapped ONNX
    atomically and record both in the manifest with the capacity and the task order of the tables.
    """
    import onnx
    import onnxruntime as ort

    repo = open_repository(config.repo)
    backbone = repo.find_backbone(config.fingerprint)
    tasks, table_w, table_b = _norm_tables(repo, backbone, config.max_tasks)
    trt, cuda = load_gpu_stack()
    gpu, capability = cuda.device_name()

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
    shapes = config.profile(backbone.num_norms, backbone.hidden_size)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fpt-trt-") as tmp:
        # By path, weights beside the graph past 2 GB: a large graph cannot be serialised in one piece.
        onnx_path = save_model(to_build, Path(tmp) / "backbone.onnx")
        log.info(
            "building a TensorRT %s %s engine on %s (B<=%d, L<=%d, T<=%d; tuned for B=%d, L=%d) ...",
            trt.__version__,
            config.variant,
            gpu,
            config.max_batch,
            config.max_len,
            config.max_tasks,
            config.opt_batch,
            config.opt_len,
        )
        engine_bytes = build_serialized(trt, onnx_path, config, shapes)
        seconds = time.perf_counter() - start
        reference_path = save_model(wrapped, Path(tmp) / "reference.onnx") if config.fp16 else onnx_path
        reference = ort.InferenceSession(str(reference_path), providers=["CPUExecutionProvider"])
        session = EngineSession(trt, cuda, engine_bytes, f"the new {config.variant} engine")
        try:
            parity = check_parity(session, reference, repo, tasks, (table_w, table_b), shapes)
        finally:
            session.close()
    for point, diff in parity.items():
        log.info("TensorRT vs ONNX Runtime at %s: max abs diff %.3g (atol %.1g)", point, diff, config.atol)
    failed = {point: diff for point, diff in parity.items() if not diff <= config.atol}
    if failed:
        listed = ", ".join(f"{point}: {diff:.3g}" for point, diff in failed.items())
        raise ExportMismatchError(
            f"the TensorRT engine differs from ONNX Runtime beyond --atol {config.atol} ({listed}); not recording it"
        )

    folder = backbone_dir(backbone.fingerprint)
    plan_rel, wrapped_rel = f"{folder}/backbone.{config.variant}.plan", f"{folder}/backbone.task-index.onnx"
    write_bytes(repo.root / plan_rel, engine_bytes)
    # Past 2 GB the weights go to <name>.data beside it, named for the final file, not the temporary one.
    location = f"{Path(wrapped_rel).name}.data"
    write_with(repo.root / wrapped_rel, lambda tmp: save_model(wrapped, tmp, location=location))
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
        "workspace_gib": config.workspace_gib,
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "compute_capability": list(capability),
        "parity_vs_onnxruntime": parity,
        "atol": config.atol,
    }
    with repository_lock(repo.root):  # re-read under the lock, so a concurrent export's additions are kept
        repo = open_repository(config.repo)
        entry = repo.backbones[backbone.fingerprint]
        for variant, rel in ((config.variant, plan_rel), ("task-index", wrapped_rel)):
            entry.files[variant], entry.sha256[variant] = rel, sha256_file(repo.root / rel)
        entry.extra.setdefault("engines", {})[config.variant] = info
        repo.save_manifest()
    log.info("wrote %s (%.1f MB) in %.0fs", plan_rel, len(engine_bytes) / 1e6, seconds)
    return EngineResult(
        path=repo.root / plan_rel,
        variant=config.variant,
        fingerprint=backbone.fingerprint,
        tasks=tasks,
        parity=parity,
        seconds=seconds,
        info=info,
    )
