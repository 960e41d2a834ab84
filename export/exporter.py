"""``export_task``: checkpoints in, a validated deployment repository out (docs/architecture.md).

Order of writes, each atomic (``fpt_deploy.atomic``), so a kill at any point leaves the previous
repository loadable. The manifest, the only file that makes new artifacts visible to a reader, is
changed in two repository transactions (``artifacts.manifest_update``: lock, re-read, change, write
once), so concurrent exports of different tasks all land:

1. shared files, one transaction: each body's backbone ONNX, once per fingerprint (skipped when the
   manifest lists it and its checksum verifies; otherwise exported to a temp file, checked against the
   PyTorch body, renamed into place), and each head shape's shared graphs. They are listed at once, so
   the tasks below are checked against listed files and a concurrent export of the same body reuses them;
2. per task, outside the lock: ``input.onnx``, ``output.onnx``, ``norms.npz``, ``heads.npz``,
   ``task.json`` staged in a temp folder, checked end to end (ORT vs PyTorch logits on held-out rows),
   then swapped in as one folder; identical files already in place are left untouched;
3. the tasks, one transaction: listed beside every other writer's, a mixed-task batch through one
   backbone call when the backbone serves more than one task and, with ``quantize="int8"``, the int8
   variant with each task's held-out accuracy float vs int8, listed only when no task loses more than
   the tolerance (or ``force``). A refused variant leaves the tasks listed and its file removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fpt_deploy.export.config import ExportConfig
from fpt_deploy.export.graphs import TaskGraphs, task_norms, write_backbone_graph, write_task_graphs
from fpt_deploy.export.heads import check_shared_heads, ensure_head_graphs, write_task_rows
from fpt_deploy.export.quantize import METHOD, QuantizationAccuracyError, check_accuracy_drop, quantize_backbone_int8
from fpt_deploy.export.validate import OrtTask, accuracy, check_backbone, check_mixed_batch, check_task, ort_session

from fpt_deploy.artifacts import (
    FP32,
    HEAD_ROWS_FILE,
    INPUT_HEAD_INPUT,
    MANIFEST,
    NORMS_FILE,
    OUTPUT_HEAD_OUTPUT,
    TASK_FILE,
    TASKS_DIR,
    BackboneArtifact,
    HeadsArtifact,
    Repository,
    TaskArtifact,
    backbone_file,
    graph_files,
    json_text,
    manifest_update,
    sha256_file,
    task_dir,
    task_file,
    verify_file,
)
from fpt_deploy.atomic import replace_dir, write_with
from fpt_deploy.errors import ArtifactError, DataUnavailableError, ExportUnsupportedError

log = logging.getLogger(__name__)

INT8 = "int8"
CALIBRATION_ROWS = 256  # held-out rows a task lends to the int8 variant's SmoothQuant ranges


@dataclass
class TaskExport:
    """What happened to one task."""

    name: str
    checkpoint: Path
    artifact: TaskArtifact
    max_abs_diff: float  # ORT vs PyTorch on logits, held-out rows
    bytes: int  # input.onnx + output.onnx + norms.npz
    written: bool  # False when the repository already held exactly these files


@dataclass
class ExportResult:
    repo: Path
    tasks: dict[str, TaskExport]
    backbones: dict[str, dict[str, Path]]  # fingerprint -> variant ("fp32", "int8") -> file
    backbones_written: list[str] = field(default_factory=list)  # "<fingerprint16>/<variant>" written this run
    mixed_batch_diff: dict[str, float] = field(default_factory=dict)  # fingerprint -> max diff
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"fp32", "int8"} with int8


def export_task(config: ExportConfig) -> ExportResult:
    """Export every task of ``config`` into ``config.repo`` and validate it; see the module docstring."""
    from fpt_deploy.checkpoint import load_checkpoint

    root = Path(config.repo)
    loaded = []
    for i, path in enumerate(config.checkpoint_paths()):
        model, task, ckpt = load_checkpoint(path)
        if blockers := model.export_blockers():
            raise ExportUnsupportedError(f"checkpoint {path} cannot be exported: {'; '.join(blockers)}")
        if config.tasks and task.name != config.tasks[i]:
            log.warning(
                "checkpoint %s holds task %r, not %r; exporting it as %r", path, task.name, config.tasks[i], task.name
            )
        loaded.append((path, model.eval(), task, ckpt))
    result = ExportResult(config.repo, {}, {})
    backbones, heads = {}, {}  # fingerprint -> BackboneArtifact; task -> its shape's HeadsArtifact
    with manifest_update(root) as repo:
        for _, model, task, ckpt in loaded:
            fp = ckpt["fingerprint"]
            if fp not in backbones:
                backbones[fp], written = ensure_backbone(repo, model.body, ckpt["backbone"], config.opset, config.atol)
                if written:
                    result.backbones_written.append(f"{fp[:16]}/{FP32}")
            heads[task.name], _ = ensure_head_graphs(repo, model, config.opset)
    sessions = {fp: ort_session(b.path(root, FP32)) for fp, b in backbones.items()}  # fingerprint -> fp32 session
    data = {}  # task -> held-out TaskData
    for path, model, task, ckpt in loaded:
        data[task.name] = task.load_data("test", config.data_dir, config.download, seed=0)
        raw = data[task.name].inputs[: config.validation_rows]
        backbone = sessions[ckpt["fingerprint"]]
        result.tasks[task.name] = write_task(root, model, task, ckpt, path, backbone, raw, config, heads[task.name])
    refused = None
    with manifest_update(root) as repo:  # other exports may have listed their tasks since this one began
        repo.tasks |= {name: export.artifact for name, export in result.tasks.items()}
        for fp, backbone in sessions.items():
            ort_tasks = _ort_tasks_with_data(repo, fp, data)
            if len(ort_tasks) > 1:
                result.mixed_batch_diff[fp] = check_mixed_batch(ort_tasks, backbone, config.atol)
        for fp in sessions if config.quantize == INT8 else ():
            try:
                written, report = ensure_int8_backbone(repo, fp, data, config, sessions[fp])
            except QuantizationAccuracyError as e:
                refused = (fp, e)  # the tasks are listed all the same; the variant is not
                break
            result.accuracy |= report
            if written:
                result.backbones_written.append(f"{fp[:16]}/{INT8}")
    if refused is not None:
        (root / backbone_file(refused[0], INT8)).unlink(missing_ok=True)  # unlisted first, then removed
        raise refused[1]
    _say_old_format_tasks(repo)
    log.info("manifest %s lists %d task(s) on %d backbone(s)", root / MANIFEST, len(repo.tasks), len(repo.backbones))
    result.backbones = {fp: {v: root / f for v, f in repo.backbones[fp].files.items()} for fp in sessions}
    return result


def _say_old_format_tasks(repo: Repository) -> None:
    """Name the tasks of an earlier format: served, but with two head sessions each instead of table rows."""
    old = sorted(name for name, t in repo.tasks.items() if not t.heads)
    if old:
        log.warning(
            "%d task(s) of %s are in the format /1 (%s): they are served with their own head sessions; "
            "re-export them (`fpt-deploy export --task ...`) so they share head graphs",
            len(old),
            repo.root,
            ", ".join(old[:10]) + (", ..." if len(old) > 10 else ""),
        )


def ensure_backbone(repo: Repository, body, name: str, opset: int, atol: float) -> tuple[BackboneArtifact, bool]:
    """The repository's fp32 backbone for ``body``, exported only when no verified copy is listed.

    Returns the artifact (added to ``repo.backbones``, inside the caller's ``manifest_update``) and
    whether a file was written. The new file is checked against the PyTorch body before it is renamed into place.
    """
    fp = body.fingerprint()
    existing = repo.backbones.get(fp)
    if existing is not None and FP32 in existing.files:
        try:
            existing.path(repo.root, FP32)
            log.info("backbone %s is already in %s; not re-exported", fp[:16], repo.root)
            if existing.opset != opset:
                log.info("(it was exported at opset %d; the backbone is written once per fingerprint)", existing.opset)
            return existing, False
        except ArtifactError as e:
            log.warning("%s; exporting the backbone again", e)
    rel = backbone_file(fp)
    log.info("exporting backbone %s (%s) to %s", fp[:16], name, repo.root / rel)

    def write_and_check(tmp: Path) -> None:
        write_backbone_graph(body, tmp, opset)
        check_backbone(body, ort_session(tmp), atol)  # the portable file every runtime reads

    write_with(repo.root / rel, write_and_check)
    artifact = BackboneArtifact(
        fingerprint=fp,
        name=name,
        hidden_size=body.hidden_size,
        num_norms=body.num_norms,
        norm_names=list(body.norm_names),
        files={FP32: rel},
        sha256={FP32: sha256_file(repo.root / rel)},
        opset=opset,
        extra={"architecture": body.architecture, "config": dict(body.config)},
    )
    if existing is not None:  # keep variants (int8) whose files still verify; they were made from this body
        for variant, file in existing.files.items():
            if variant != FP32:
                artifact.files[variant], artifact.sha256[variant] = file, existing.sha256[variant]
        artifact.extra = {**existing.extra, **artifact.extra}
    repo.backbones[fp] = artifact
    return artifact, True


def write_task(
    root: Path,
    model,
    task,
    ckpt: dict,
    checkpoint: Path,
    backbone,
    raw: np.ndarray,
    config: ExportConfig,
    heads: HeadsArtifact,
) -> TaskExport:
    """Stage, validate and swap in one task's folder (heads, rows of the shared heads, norms, task.json)."""
    rel = task_dir(task.name)
    stage = Path(tempfile.mkdtemp(dir=_ensure_dir(root / TASKS_DIR), prefix=f".{task.name}.", suffix=".stage"))
    try:
        graphs = write_task_graphs(model, stage, config.opset)
        ort_task = OrtTask.load(graphs.input, graphs.output, task_norms(model))
        diff = check_task(task.name, model, ort_task, backbone, raw, config.atol)
        write_task_rows(model, stage / HEAD_ROWS_FILE)
        diff = max(diff, check_shared_heads(task.name, model, heads, root, backbone, raw, config.atol))
        artifact = _task_artifact(task, ckpt, checkpoint, graphs, rel, diff, len(raw), config.opset)
        artifact.heads = heads.key
        artifact.files["heads"] = f"{rel}/{HEAD_ROWS_FILE}"
        artifact.sha256["heads"] = sha256_file(stage / HEAD_ROWS_FILE)
        size = sum(p.stat().st_size for p in (graphs.input, graphs.output, graphs.norms, stage / HEAD_ROWS_FILE))
        written = not _same_task_in_place(root, artifact)
        if written:
            (stage / TASK_FILE).write_text(json_text(artifact.to_json()))

            def fill(tmp: Path) -> None:
                for f in os.listdir(stage):
                    os.replace(stage / f, tmp / f)

            replace_dir(root / rel, fill)
            log.info("task %s: heads + norms %.1f KB written to %s", task.name, size / 1024, root / rel)
        else:
            log.info("task %s: identical files already in %s; left untouched", task.name, root / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return TaskExport(task.name, checkpoint, artifact, diff, size, written)


def ensure_int8_backbone(
    repo: Repository, fp: str, data: dict, config: ExportConfig, fp32_session
) -> tuple[bool, dict]:
    """Add (or re-check) the int8 variant of backbone ``fp``; returns (written, accuracy report).

    ``fp32_session`` runs the float backbone (``ort_session``).

    Every task of this backbone whose held-out data loads is evaluated with the float and the int8
    graph. When one loses more than ``config.accuracy_tolerance`` points, the variant is dropped from
    ``repo`` (the caller's ``manifest_update``; the caller removes the file once the manifest no longer
    lists it) and ``QuantizationAccuracyError`` is raised, unless ``force``.
    """
    artifact = repo.backbones[fp]
    rel = backbone_file(fp, INT8)
    written = False
    tasks = _ort_tasks_with_data(repo, fp, data, full=True)
    try:
        if INT8 not in artifact.files:
            raise ArtifactError("no int8 variant yet")
        artifact.path(repo.root, INT8)
    except ArtifactError:
        calibration = _calibration_feeds(tasks)
        write_with(
            repo.root / rel, lambda tmp: quantize_backbone_int8(artifact.path(repo.root, FP32), tmp, calibration)
        )
        written = True
    fp32, int8 = fp32_session, ort_session(repo.root / rel)
    report = {}
    for name, (ort_task, td) in tasks.items():
        labels = td.labels
        report[name] = {
            FP32: accuracy(ort_task, fp32, td.inputs, labels),
            INT8: accuracy(ort_task, int8, td.inputs, labels),
        }
    try:
        forced = check_accuracy_drop(report, config.accuracy_tolerance, config.force)
    except QuantizationAccuracyError:
        artifact.files.pop(INT8, None)
        artifact.sha256.pop(INT8, None)
        artifact.extra.pop(INT8, None)
        raise
    artifact.files[INT8], artifact.sha256[INT8] = rel, sha256_file(repo.root / rel)
    artifact.extra[INT8] = {
        "method": METHOD,
        "accuracy": report,
        "forced": forced,
        "accuracy_tolerance_points": config.accuracy_tolerance,
    }
    return written, report


def _task_artifact(
    task, ckpt: dict, checkpoint: Path, graphs: TaskGraphs, rel: str, diff: float, rows: int, opset: int
) -> TaskArtifact:
    spec = task.spec
    files = {**graph_files(rel), "norms": f"{rel}/{NORMS_FILE}"}
    return TaskArtifact(
        name=task.name,
        fingerprint=ckpt["fingerprint"],
        spec=spec,
        input={"name": INPUT_HEAD_INPUT, "shape": [-1, *spec.input_shape], "dtype": spec.input_dtype},
        output={"name": OUTPUT_HEAD_OUTPUT, "shape": [-1, *spec.logits_shape], "dtype": "float32"},
        labels=list(spec.labels),
        files=files,
        sha256={
            k: sha256_file(p) for k, p in (("input", graphs.input), ("output", graphs.output), ("norms", graphs.norms))
        },
        metrics={
            "checkpoint": ckpt.get("metrics", {}),
            "export": {
                "max_abs_diff_logits": diff,
                "validation_rows": rows,
                "opset": opset,
                "checkpoint_path": str(checkpoint),
            },
        },
    )


def _same_task_in_place(root: Path, artifact: TaskArtifact) -> bool:
    """Whether the repository already holds exactly this task (same task.json, files verified)."""
    path = root / task_file(artifact.name)
    try:
        if json.loads(path.read_text()) != json.loads(json.dumps(artifact.to_json())):
            return False
        for kind, rel in artifact.files.items():
            verify_file(root, rel, artifact.sha256[kind])
    except (OSError, ValueError, ArtifactError):
        return False
    return True


def _ort_tasks_with_data(repo: Repository, fp: str, data: dict, full: bool = False) -> dict:
    """ORT pipelines of the repository's tasks on backbone ``fp``, with raw inputs (or TaskData if ``full``).

    Tasks exported in this run bring their data in ``data``; others load their held-out split and are
    skipped, with a warning, where it cannot be read here.
    """
    from fpt_deploy.tasks import get_task

    out = {}
    for name, t in sorted(repo.tasks.items()):
        if t.fingerprint != fp:
            continue
        if "input" not in t.files:  # rows only (export.heads.write_task_from_rows): no graphs of its own to check
            continue
        if name not in data:
            try:
                data[name] = get_task(name, **t.spec.options).load_data("test")
            except DataUnavailableError as e:
                log.warning("task %s is left out of the checks on this backbone: %s", name, e)
                continue
        ort_task = OrtTask.load(
            verify_file(repo.root, t.files["input"], t.sha256["input"]),
            verify_file(repo.root, t.files["output"], t.sha256["output"]),
            t.load_norms(repo.root),
        )
        out[name] = (ort_task, data[name] if full else data[name].inputs)
    return out


def _calibration_feeds(tasks: dict, rows: int = CALIBRATION_ROWS, chunk: int = 64) -> list[dict]:
    """Backbone feeds for SmoothQuant's activation ranges: each task's first ``rows`` held-out rows."""
    feeds = []
    for ort_task, td in tasks.values():
        raw = td.inputs[:rows]
        for i in range(0, len(raw), chunk):
            hidden, mask = ort_task.embed(raw[i : i + chunk])
            weight, bias = ort_task.norm_rows(len(hidden))
            feeds.append({"hidden": hidden, "attention_mask": mask, "norm_weight": weight, "norm_bias": bias})
    return feeds


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
