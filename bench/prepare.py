"""What every section uses, built (and cached under ``<out>/work``) before the first one runs.

Tasks: the MNIST checkpoint (``--checkpoint``, else ``runs/mnist/best``, else a short run trained here)
and ``mix - 1`` clones of its heads under new names: MNIST-shaped rows of distinct tasks. Throughput
does not depend on head values; the int8 accuracy check does, so it is only meaningful for a real
checkpoint (the results say which one was used). Artifacts built here (checkpoint, repository with
the int8 variant, per-task full-model ONNX) are reused by later runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.config import ROOT, SuiteConfig
from bench.serve_load import clone_tasks

log = logging.getLogger("bench.prepare")


@dataclass
class Prepared:
    """The artifacts every section uses."""

    checkpoint: Path
    checkpoint_info: dict
    repo: Path  # the source repository (fp32 + int8 backbone when available)
    task: str  # its MNIST-shaped task
    variants: list[str]  # backbone variants present
    mixed: Path  # a copy holding the task and its clones
    tasks: list[str]  # names served in the load
    full_onnx: Path | None  # the task's whole model in one graph (ort per task)
    rows: np.ndarray  # real held-out inputs (n, 28, 28) uint8
    notes: list[str] = field(default_factory=list)


def machine_facts() -> dict:
    """CPU, cores, SIMD flags that matter here, library versions, thread-related environment."""
    import onnxruntime
    import psutil

    from fpt_deploy.cpu import FLAGS, cpu_features

    features = cpu_features()
    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "ORT_"))}
    return {
        "cpu": features.model,
        "cpu_described": features.describe(),
        "native_bf16": features.native_bf16,
        "vnni": features.vnni,
        "avx512": features.avx512,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "flags": {k: k in features.flags for k in FLAGS},
        "versions": versions,
        "torch_threads": torch_threads,
        "env": env,
        "load_avg_1m_start": os.getloadavg()[0],
        "platform": platform.platform(),
    }


def file_key(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def resolve_checkpoint(cfg: SuiteConfig) -> tuple[Path, dict]:
    """The MNIST checkpoint: given, the lead's ``runs/mnist/best``, or a short run trained (and cached) here."""
    from fpt_deploy.checkpoint import read_checkpoint_config, resolve_checkpoint

    default = ROOT / "runs" / "mnist" / "best"
    if cfg.checkpoint:
        path, source = resolve_checkpoint(cfg.checkpoint), "given (--checkpoint)"
    elif (default / "config.json").is_file() and read_checkpoint_config(default).get("backbone") == cfg.backbone:
        path, source = default, "runs/mnist/best"
    else:
        out = cfg.work / f"train-mnist-{cfg.backbone}-{cfg.train_steps}"
        if not (out / "best" / "config.json").is_file():
            from fpt_deploy.training import TrainConfig, train

            log.info("no MNIST checkpoint for %s: training %d steps into %s", cfg.backbone, cfg.train_steps, out)
            train(
                TrainConfig(
                    task="mnist",
                    backbone=cfg.backbone,
                    steps=cfg.train_steps,
                    eval_every=cfg.train_steps,
                    batch_size=32,
                    device="cpu",
                    out=out,
                    progress=False,
                )
            )
        path, source = out / "best", f"trained here ({cfg.train_steps} steps): throughput only"
    config = read_checkpoint_config(path)
    info = {
        "path": str(path),
        "source": source,
        "task": config["task"],
        "backbone": config["backbone"],
        "fingerprint": config["fingerprint"][:16],
        "test_accuracy": config.get("metrics", {}).get("test_accuracy"),
        "real": not source.startswith("trained here"),
    }
    return path, info


def build_repository(cfg: SuiteConfig, checkpoint: Path) -> Path:
    """A deployment repository of ``checkpoint`` with the int8 variant (cached under ``work``)."""
    from fpt_deploy.export import ExportConfig, export_task

    from fpt_deploy.artifacts import MANIFEST, open_repository

    repo = cfg.work / f"repo-{file_key(checkpoint)}"
    if (repo / MANIFEST).is_file():
        r = open_repository(repo)
        shared = all(t.heads for t in r.tasks.values())  # format /2: built before shared heads otherwise
        if r.tasks and shared and all("int8" in b.files for b in r.backbones.values()):
            return repo
    log.info("exporting %s (fp32 + int8) into %s", checkpoint, repo)
    # force: the suite measures speed; the accuracy report is read from the manifest and judged there.
    export_task(ExportConfig(checkpoints=[checkpoint], repo=repo, quantize="int8", force=True, validation_rows=64))
    return repo


def export_full_model(checkpoint: Path, path: Path) -> float:
    """The task's whole model (input head + body + output head) as ONE ONNX graph; max |ORT - torch|."""
    import onnxruntime as ort
    import torch
    from fpt_deploy.export.graphs import example_raw_input
    from fpt_deploy.export.onnx_workarounds import export_onnx

    from fpt_deploy.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)[0].eval()
    if not path.is_file():
        log.info("exporting the full model of %s to %s (ort per task baseline)", checkpoint, path)
        tmp = path.with_suffix(".tmp")
        export_onnx(
            model,
            (example_raw_input(model.spec),),
            tmp,
            input_names=("input",),
            output_names=("logits",),
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset=18,
        )
        os.replace(tmp, path)
    raw = np.random.default_rng(0).integers(0, 256, (4, *model.spec.input_shape)).astype(model.spec.input_dtype)
    with torch.inference_mode():
        expected = model(torch.from_numpy(raw)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": raw})[0]
    return float(np.abs(got - expected).max())


def pick_task(repo: Path, wanted: str | None) -> str:
    from fpt_deploy.artifacts import open_repository

    tasks = open_repository(repo).tasks
    if wanted:
        if wanted not in tasks:
            raise ValueError(f"task {wanted!r} is not in {repo} (has {', '.join(sorted(tasks))})")
        return wanted
    shaped = sorted(n for n, t in tasks.items() if list(t.input["shape"][1:]) == [28, 28])
    if not shaped:
        raise ValueError(f"{repo} has no MNIST-shaped task (input [-1, 28, 28]); pass --task or another --repo")
    return "mnist" if "mnist" in shaped else shaped[0]


def prepare(cfg: SuiteConfig, scratch: Path) -> Prepared:
    from fpt_deploy.artifacts import open_repository
    from fpt_deploy.tasks import get_task

    cfg.work.mkdir(parents=True, exist_ok=True)
    notes = []
    checkpoint, info = resolve_checkpoint(cfg)
    if not info["real"]:
        notes.append(
            f"No real MNIST checkpoint (runs/mnist/best) for {cfg.backbone}: a {cfg.train_steps}-step run was "
            "trained here. Throughput and memory figures are unaffected; the int8 accuracy comparison is not "
            "meaningful."
        )
    repo = cfg.repo or build_repository(cfg, checkpoint)
    task = pick_task(repo, cfg.task)
    r = open_repository(repo)
    art = r.tasks[task]
    backbone = r.backbones[art.fingerprint]
    if art.fingerprint[:16] != info["fingerprint"]:
        notes.append(
            f"The repository's task {task} and the checkpoint {checkpoint} have different backbones: "
            "the baselines serve the checkpoint's model."
        )
    variants = [v for v in ("fp32", "int8") if v in backbone.files]
    if "int8" not in variants:
        notes.append(f"{repo} has no int8 backbone (`fpt-deploy export --quantize int8`): int8 rows are missing.")
    mixed = scratch / "mixed"
    tasks = clone_tasks(repo, task, cfg.mix, mixed)
    full_onnx, diff = cfg.work / f"full-{file_key(checkpoint)}.onnx", None
    try:
        diff = export_full_model(checkpoint, full_onnx)
        log.info("full-model ONNX vs torch: max |diff| %.2e", diff)
    except Exception as e:  # noqa: BLE001  (the ort baseline is then reported missing, the rest runs)
        log.warning("full-model ONNX export failed: %s", e)
        notes.append(f"The per-task full-model ONNX export failed ({e}); no 'ort per task' baseline.")
        full_onnx = None
    info["full_onnx_max_abs_diff"] = diff
    rows = get_task(art.spec.name, **art.spec.options).load_data("test").inputs[:64]
    return Prepared(checkpoint, info, repo, task, variants, mixed, tasks, full_onnx, np.ascontiguousarray(rows), notes)


def int8_accuracy(repo: Path) -> dict:
    """The export's held-out accuracy report, fp32 vs int8, per task (from the manifest)."""
    from fpt_deploy.artifacts import open_repository

    out = {}
    for b in open_repository(repo).backbones.values():
        report = b.extra.get("int8", {})
        for name, acc in report.get("accuracy", {}).items():
            out[name] = {**acc, "drop_points": 100 * (acc["fp32"] - acc["int8"])}
    return out
