"""The benchmark suite: every figure of issues 5 and 14 measured in ONE run, on the same tasks and inputs.

    .venv/bin/python -m bench [--quick] [--repo DIR] [--checkpoint DIR] [--out bench/results]

Sections (``SECTIONS``), in the order they run:

- ``gemm``: float32 (and bf16) matrix-product GFLOP/s with torch on this CPU: the machine's limit.
- ``backbone``: the shared body alone at batch 1, 8, 32 (32 = the server's ceiling): ONNX Runtime fp32 and
  int8 with the server's own session options (``serving.runtimes.ort.OrtRuntime``), and the PyTorch eager body.
  Contenders alternate in short rounds and the best round counts (the machine is shared).
- ``many_tasks`` (``bench.many_tasks``): N = 1, 10, 100, 1,000 tasks on one server, uniform and Zipf
  traffic, concurrency 1, 8, 32: rows/s, p50/p99, start-up time and RSS per contender and N; per-task
  servers stop (and say why) where their projected memory or start-up time is out of bounds.
- ``load``: four servers on 127.0.0.1, all driven by the same closed-loop load generator
  (``bench.serve_load.load``): one MNIST row a request in the binary KServe v2 format, tasks mixed
  round-robin, concurrency 1, 8, 32, a bounded number of requests and seconds per level. Contenders:
  the fpt-deploy server (fp32 and int8 backbone), "torch per task" and "ort per task"
  (``bench.baseline_server``: one complete model per task, what a user without fpt-deploy writes).
  ``load_rounds`` rounds, each over every level of every contender, so a burst of load elsewhere hits
  all of them; a level's figures are the mean of its rounds. Right after each fpt-deploy level the raw
  backbone is timed again at that level's batch: the ceiling "/ raw backbone" divides by.
- ``training``: optimizer steps/s of the FPT step vs full fine-tuning of the same model and batch,
  fp32 and bf16 autocast, on CPU.

The CPU's features are recorded (``fpt_deploy.cpu``); contenders that would be emulated (bf16 without
avx512_bf16 or amx_bf16) are skipped with the reason. The whole suite keeps to ``budget_s`` (15 minutes
on 2 cores): ``many_tasks`` stops ``reserve_s`` before it for the sections after it, and a level or
section past the budget is skipped and reported as such.

Tasks: the MNIST checkpoint (``--checkpoint``, else ``runs/mnist/best``, else a short run trained here)
and ``mix - 1`` clones of its heads under new names: MNIST-shaped rows of distinct tasks. Throughput
does not depend on head values; the int8 accuracy check does, so it is only meaningful for a real
checkpoint (the results say which one was used). Artifacts built here (checkpoint, repository with
the int8 variant, per-task full-model ONNX) are cached under ``<out>/work`` and reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.many_tasks import bench_tasks
from bench.serve_load import ServerProcess, binary_request, clone_tasks, free_port, load

log = logging.getLogger("bench.suite")
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("gemm", "backbone", "many_tasks", "load", "training")
FPT_FP32, FPT_INT8 = "fpt-deploy fp32", "fpt-deploy int8"
TORCH_PER_TASK, ORT_PER_TASK = "torch per task", "ort per task"


@dataclass
class SuiteConfig:
    """What to measure and how long; ``quick()`` gives the ~2 minute variant."""

    out: Path = ROOT / "bench" / "results"  # JSON results and PNG plots
    markdown: Path | None = ROOT / "BENCHMARKS.md"  # the table; None: not written
    work: Path | None = None  # cache of built artifacts; default <out>/work
    repo: Path | None = None  # deployment repository with an MNIST-shaped task; default: built here
    checkpoint: Path | None = None  # MNIST checkpoint; default runs/mnist/best, else trained here
    backbone: str = "minilm"  # for a checkpoint trained here
    train_steps: int = 40  # steps of a checkpoint trained here (throughput work only)
    task: str | None = None  # task of --repo to serve (default: its mnist task)
    mix: int = 2  # distinct tasks mixed in the load (the task and mix-1 clones)
    concurrency: tuple[int, ...] = (1, 8, 32)
    level_seconds: float = 5.0  # at most this long per load level and round
    load_rounds: int = 1  # rounds over every load level of every contender (figures: the mean)
    raw_seconds_in_load: float = 3.0  # the raw backbone timed right after each fpt-deploy level
    level_requests: int = 2000  # at most this many requests per load level
    raw_batches: tuple[int, ...] = (1, 8, 32)
    raw_seconds: float = 1.0  # per round and contender
    raw_rounds: int = 2
    gemm_size: int = 2048
    gemm_seconds: float = 2.0
    train_batch: int = 32
    train_timed_steps: int = 5  # timed optimizer steps per training configuration (after 1 warm-up)
    train_seconds: float = 20.0  # at most this long per training configuration
    threads: int | None = None  # intra-op threads everywhere; default physical cores
    task_counts: tuple[int, ...] = (1, 10, 100, 1000)  # N tasks on one server (many_tasks section)
    tasks_level_seconds: float = 3.0  # at most this long per level of the many_tasks section
    tasks_requests_cycled: int = 2048  # requests drawn from the traffic distribution, then cycled
    per_task_max_tasks: int = 100  # per-task baselines never start more tasks than this
    per_task_max_rss_gb: float = 12.0  # ... nor when their projected resident memory exceeds this
    per_task_max_startup_s: float = 180.0  # ... nor when their projected start-up takes longer
    baseline_full_levels_tasks: int = 10  # beyond this N, per-task servers run only uniform at the top c
    max_resident_tasks: int = 256  # the paged fp32 contender's --max-resident-tasks (N above it only)
    goal_rounds: int = 3  # fp32 at N=1 and N=100 measured again, alternated, for the goal comparing them
    budget_s: float = 14 * 60.0  # the whole suite; levels past it are skipped (and say so)
    reserve_s: float = 200.0  # kept for the sections after many_tasks (load, training)
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    plots: bool = True
    skip: tuple[str, ...] = ()  # sections not to run
    quick_mode: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.skip if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
        if self.mix < 1:
            raise ValueError(f"mix must be >= 1 (got {self.mix})")
        if self.max_resident_tasks < self.max_batch_size:
            raise ValueError(
                f"max_resident_tasks must be >= max_batch_size {self.max_batch_size} (got {self.max_resident_tasks})"
            )
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work else self.out / "work"

    @classmethod
    def quick(cls, **overrides) -> SuiteConfig:
        quick = dict(
            train_steps=10,
            concurrency=(1, 8, 32),
            level_seconds=2.0,
            load_rounds=1,
            raw_seconds_in_load=1.0,
            level_requests=400,
            raw_seconds=0.4,
            raw_rounds=2,
            gemm_seconds=1.0,
            train_timed_steps=2,
            train_seconds=5.0,
            tasks_level_seconds=1.5,
            tasks_requests_cycled=1024,
            per_task_max_tasks=10,
            budget_s=7 * 60.0,
            reserve_s=90.0,
            quick_mode=True,
        )
        return cls(**{**quick, **overrides})


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


# ---------------------------------------------------------------------------------------------- machine


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


# ------------------------------------------------------------------------------------------------ servers


def fpt_server(repo: Path, variant: str, cfg: SuiteConfig, max_resident_tasks: int | None = None) -> ServerProcess:
    port = free_port()
    argv = ["-m", "fpt_deploy.cli", "-q", "serve", "--repo", str(repo), "--port", str(port)]
    argv += ["--backbone-variant", variant, "--max-batch-size", str(cfg.max_batch_size)]
    argv += ["--max-queue-delay-ms", str(cfg.max_queue_delay_ms)]
    if max_resident_tasks is not None:
        argv += ["--max-resident-tasks", str(max_resident_tasks)]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    return ServerProcess(f"fpt-deploy {variant}", argv, port)


def baseline_server(runtime: str, models: dict[str, Path], cfg: SuiteConfig) -> ServerProcess:
    port = free_port()
    argv = ["-m", "bench.baseline_server", "--runtime", runtime, "--port", str(port)]
    argv += ["--max-batch-size", str(cfg.max_batch_size), "--max-queue-delay-ms", str(cfg.max_queue_delay_ms)]
    for name, path in models.items():
        argv += ["--model", f"{name}={path}"]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    return ServerProcess(f"{runtime} per task", argv, port)


def start_all(servers: dict[str, ServerProcess]) -> dict[str, ServerProcess]:
    """Wait for every started server; on any failure stop them all and re-raise."""
    try:
        for server in servers.values():
            server.wait_ready()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


# ------------------------------------------------------------------------------------------- preparation


def _file_key(path: Path) -> str:
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

    from fpt_deploy.artifacts import open_repository

    repo = cfg.work / f"repo-{_file_key(checkpoint)}"
    if (repo / "manifest.json").is_file():
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


def _pick_task(repo: Path, wanted: str | None) -> str:
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
    task = _pick_task(repo, cfg.task)
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
    full_onnx, diff = cfg.work / f"full-{_file_key(checkpoint)}.onnx", None
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


# ------------------------------------------------------------------------------------------------ sections


def bench_gemm(cfg: SuiteConfig) -> dict:
    """Matrix-product peak of this CPU with torch: n^3 products, float32 and bf16 alternating, best call."""
    import torch
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    torch.set_num_threads(cfg.threads or physical_cores())
    n = cfg.gemm_size
    operands = {}
    from fpt_deploy.cpu import cpu_features

    native_bf16 = cpu_features().native_bf16  # emulated bf16 would take minutes and show nothing
    for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        operands[str(dtype).split(".")[1]] = (a, b, torch.mm(a, b))  # the first call warms the thread pool
    x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    calls = {name: (lambda a=a, b=b, c=c: torch.mm(a, b, out=c)) for name, (a, b, c) in operands.items()}
    calls["numpy_float32"] = lambda: np.matmul(x, x)  # numpy's BLAS (OpenBLAS: OPENBLAS_* applies)
    best = dict.fromkeys(calls, float("inf"))
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < cfg.gemm_seconds and rounds < 1000):
        for name, fn in calls.items():  # alternate: a burst of load elsewhere hits every contender
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    out = {"size": n, "threads": torch.get_num_threads(), "rounds": rounds}
    if not native_bf16:
        out["skipped"] = {"bfloat16": "no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16): emulated"}
    out |= {f"{name}_gflops": 2 * n**3 / seconds / 1e9 for name, seconds in best.items()}
    out["peak_float32_gflops"] = max(out["float32_gflops"], out["numpy_float32_gflops"])
    return out


def body_flops_per_row(config: dict, length: int) -> float | None:
    """Multiply-adds x2 of one row through a BERT/GPT-2 body: the dense layers plus attention."""
    d = config.get("hidden_size") or config.get("n_embd")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    ff = config.get("intermediate_size") or config.get("n_inner") or (4 * d if d else None)
    if not (d and layers and ff):
        return None
    dense = 2 * length * (4 * d * d + 2 * d * ff)  # qkv (3 D^2) + attention output (D^2) + the two FF layers
    attention = 4 * length * length * d  # Q.K^T and P.V
    return float(layers * (dense + attention))


def _raw_rate(fn, batch: int, seconds: float) -> float:
    """Rows/s of ``fn`` (one backbone call of ``batch`` rows) over about ``seconds``."""
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - t0 < seconds and calls < 10_000):
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - t0)


def _backbone_rows(prep: Prepared, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """What the server's backbone sees: the task's input head on ``batch`` real held-out rows.

    hidden (B, L, D) float32, attention_mask (B, L) int64.
    """
    from fpt_deploy.serving.runtimes.sessions import create_head_session

    from fpt_deploy.artifacts import open_repository, verify_file

    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    head = create_head_session(verify_file(r.root, art.files["input"], art.sha256["input"]))
    hidden, mask = head.run(None, {"input": prep.rows[np.arange(batch) % len(prep.rows)]})
    return hidden, mask


def bench_backbone(cfg: SuiteConfig, prep: Prepared) -> dict:
    """Rows/s of the body alone: ORT (server session options) fp32/int8 and PyTorch eager, per batch."""
    import torch
    from fpt_deploy.serving.runtimes.ort import OrtRuntime
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    from fpt_deploy.artifacts import open_repository
    from fpt_deploy.backbones import load_backbone

    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    b = r.backbones[art.fingerprint]
    weight, bias = art.load_norms(r.root)
    length = art.spec.seq_len
    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    runtimes = {v: OrtRuntime(b.path(r.root, v), weight[None], bias[None], threads=threads) for v in prep.variants}
    body = load_backbone(b.name).eval()
    results: dict[str, dict[int, float]] = {f"ort {v}": {} for v in runtimes} | {"torch eager": {}}
    for batch in cfg.raw_batches:
        hidden, mask = _backbone_rows(prep, batch)
        index = np.zeros(batch, np.int64)
        t_args = (
            torch.from_numpy(hidden),
            torch.from_numpy(mask),
            torch.from_numpy(weight).expand(batch, -1, -1),
            torch.from_numpy(bias).expand(batch, -1, -1),
        )

        def run_torch(t_args=t_args):
            with torch.inference_mode():
                body(*t_args)

        contenders = {
            f"ort {v}": (lambda rt=rt, h=hidden, m=mask, i=index: rt.run_backbone(h, m, i))
            for v, rt in runtimes.items()
        }
        contenders["torch eager"] = run_torch
        for fn in contenders.values():
            fn()  # warm-up: first calls allocate
        for _ in range(cfg.raw_rounds):  # alternate, so a burst of load elsewhere hits every contender
            for name, fn in contenders.items():
                rate = _raw_rate(fn, batch, cfg.raw_seconds)
                results[name][batch] = max(results[name].get(batch, 0.0), rate)
    for rt in runtimes.values():
        rt.close()
    return {
        "backbone": b.name,
        "row_tokens": length,
        "threads": threads,
        "flops_per_row": body_flops_per_row(b.extra.get("config", {}), length),
        "rows_per_s": results,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:7.1f}"


def _bodies(prep: Prepared) -> list[tuple[str, bytes, dict]]:
    """Requests cycled by the load generator: one real held-out row each, tasks round-robin."""
    n = max(len(prep.tasks), min(len(prep.rows), 16))
    return [(prep.tasks[i % len(prep.tasks)], *binary_request(prep.rows[i % len(prep.rows)][None])) for i in range(n)]


def _mean_level(rounds: list[dict]) -> dict:
    """One level from its rounds: throughput and latencies averaged, requests and errors summed."""
    out = dict(rounds[0])
    for key in ("rows_per_s", "p50_ms", "p99_ms", "seconds"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    out["p99_over_p50"] = out["p99_ms"] / out["p50_ms"] if out["p50_ms"] else None
    out["requests"] = sum(r["requests"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["first_error"] = next((r["first_error"] for r in rounds if r.get("first_error")), None)
    out["rounds"] = [{k: r[k] for k in ("rows_per_s", "p50_ms", "p99_ms", "requests", "errors")} for r in rounds]
    return out


def bench_load(cfg: SuiteConfig, prep: Prepared) -> dict:
    """Every contender's throughput and latency at each concurrency, contenders alternating.

    ``load_rounds`` rounds, each visiting every level of every contender, so a burst of load elsewhere
    on the machine hits all of them; a level's figures are the mean over its rounds. After each
    fpt-deploy level, the raw backbone (this process, the server's session options, the batch the
    level's batches can reach) is timed right then, with every server idle: the ceiling that level is
    compared with, measured in the same minute.
    """
    from fpt_deploy.serving.runtimes.ort import OrtRuntime
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    from fpt_deploy.artifacts import open_repository

    servers: dict[str, ServerProcess] = {}
    for variant in prep.variants:
        servers[f"fpt-deploy {variant}"] = fpt_server(prep.mixed, variant, cfg)
    servers[TORCH_PER_TASK] = baseline_server("torch", dict.fromkeys(prep.tasks, prep.checkpoint), cfg)
    if prep.full_onnx:
        servers[ORT_PER_TASK] = baseline_server("ort", dict.fromkeys(prep.tasks, prep.full_onnx), cfg)
    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    b = r.backbones[art.fingerprint]
    weight, bias = art.load_norms(r.root)
    threads = cfg.threads or physical_cores()
    runtimes = {v: OrtRuntime(b.path(r.root, v), weight[None], bias[None], threads=threads) for v in prep.variants}
    bodies = _bodies(prep)
    rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in cfg.concurrency} for name in servers}
    ceilings: dict[str, dict[int, list[float]]] = {v: {c: [] for c in cfg.concurrency} for v in runtimes}
    start_all(servers)
    try:
        for server in servers.values():  # warm-up: every task, every batch size the levels reach
            load(server.port, bodies, max(cfg.concurrency), max_requests=4 * max(cfg.concurrency), max_seconds=20)
        rows = {c: _backbone_rows(prep, min(c, cfg.max_batch_size)) for c in cfg.concurrency}
        for k in range(cfg.load_rounds):
            for c in cfg.concurrency:
                batch = min(c, cfg.max_batch_size)
                hidden, mask = rows[c]
                index = np.zeros(batch, np.int64)
                for name, server in servers.items():
                    level = load(server.port, bodies, c, cfg.level_requests, cfg.level_seconds)
                    rounds[name][c].append(level)
                    extra = ""
                    variant = name[len("fpt-deploy ") :] if name.startswith("fpt-deploy ") else None
                    if variant in runtimes:
                        call = lambda rt=runtimes[variant]: rt.run_backbone(hidden, mask, index)  # noqa: E731
                        rate = _raw_rate(call, batch, cfg.raw_seconds_in_load)
                        ceilings[variant][c].append(rate)
                        extra = f"  (raw backbone batch {batch}: {rate:.1f} rows/s)"
                    log.info(
                        "round %d/%d %-16s c=%-3d %7.1f rows/s  p50 %s ms  p99 %s ms  errors %d%s%s",
                        k + 1,
                        cfg.load_rounds,
                        name,
                        c,
                        level["rows_per_s"],
                        _ms(level["p50_ms"]),
                        _ms(level["p99_ms"]),
                        level["errors"],
                        f" (first: {level['first_error']})" if level["errors"] else "",
                        extra,
                    )
    finally:
        for server in servers.values():
            server.stop()
        for rt in runtimes.values():
            rt.close()
    levels = {name: [_mean_level(rounds[name][c]) for c in cfg.concurrency] for name in servers}
    for variant, by_c in ceilings.items():
        for level in levels[f"fpt-deploy {variant}"]:
            rates = by_c[level["concurrency"]]
            level["raw_backbone_rows_per_s"] = sum(rates) / len(rates)
            level["raw_backbone_rounds"] = rates
    return {"tasks": prep.tasks, "requests_cycled": len(bodies), "rounds": cfg.load_rounds, "levels": levels}


def bench_training(cfg: SuiteConfig, prep: Prepared, deadline: float = float("inf")) -> dict:
    """Optimizer steps/s: the FPT step (heads, positions, norms train) vs full fine-tuning, fp32 and bf16."""
    import torch
    from fpt_deploy.serving.runtimes.sessions import physical_cores
    from fpt_deploy.training.loop import autocast, loss_and_correct

    from fpt_deploy.backbones import load_backbone
    from fpt_deploy.model import FPT
    from fpt_deploy.tasks import get_task

    torch.set_num_threads(cfg.threads or physical_cores())
    task = get_task("mnist")
    data = task.load_data("train")
    x = torch.from_numpy(data.inputs[: cfg.train_batch])
    y = torch.from_numpy(data.labels[: cfg.train_batch])
    base = load_backbone(prep.checkpoint_info["backbone"])
    device = torch.device("cpu")
    from fpt_deploy.cpu import cpu_features

    rows, skipped = [], {}
    native_bf16 = cpu_features().native_bf16
    if not native_bf16:
        skipped["bf16 autocast"] = "no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16): emulated"
    for bf16 in (False, True) if native_bf16 else (False,):
        for mode in ("fpt", "full fine-tuning"):
            if time.perf_counter() > deadline:
                skipped[f"{mode}, {'bf16 autocast' if bf16 else 'fp32'}"] = "the suite's time budget was spent"
                continue
            torch.manual_seed(0)
            model = FPT(task, copy.deepcopy(base)).train()
            if mode != "fpt":
                for p in model.parameters():
                    p.requires_grad_(True)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=1e-3)

            def step(model=model, params=params, optimizer=optimizer, bf16=bf16) -> float:
                with autocast(device, bf16):
                    logits = model(x)
                loss = loss_and_correct(logits, y)[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                return loss.detach().item()

            step()  # warm-up: allocations, Adam state
            steps, t0 = 0, time.perf_counter()
            seconds = min(cfg.train_seconds, deadline - t0)
            while steps < 1 or (steps < cfg.train_timed_steps and time.perf_counter() - t0 < seconds):
                loss = step()
                steps += 1
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "mode": mode,
                    "precision": "bf16 autocast" if bf16 else "fp32",
                    "steps": steps,
                    "steps_per_s": steps / seconds,
                    "rows_per_s": steps * cfg.train_batch / seconds,
                    "trainable_params": sum(p.numel() for p in params),
                    "last_loss": loss,
                }
            )
            log.info("training %-16s %-13s %.2f steps/s", mode, rows[-1]["precision"], rows[-1]["steps_per_s"])
    return {
        "task": "mnist",
        "batch": cfg.train_batch,
        "backbone": prep.checkpoint_info["backbone"],
        "steps": rows,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------------- driver


def run_suite(cfg: SuiteConfig) -> dict:
    """Run every section not skipped; write JSON, plots and markdown; return the results.

    A failing section is recorded (``errors``) and the others still run.
    """
    started = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "suite": "fpt-deploy bench",
        "quick": cfg.quick_mode,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine_facts(),
        "errors": {},
        "notes": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="fpt-bench-suite-"))
    try:
        prep = prepare(cfg, scratch)
        results["notes"] += prep.notes
        results["checkpoint"] = prep.checkpoint_info
        results["repository"] = {"path": str(prep.repo), "task": prep.task, "variants": prep.variants}
        results["tasks"] = prep.tasks
        results["int8_accuracy"] = int8_accuracy(prep.repo)
        # On the perf_counter clock. A preparation that took over half the budget (building every artifact
        # on a slow machine) still leaves the sections half of it: a run that measures nothing shows nothing.
        deadline = max(
            time.perf_counter() - (time.time() - started) + cfg.budget_s, time.perf_counter() + cfg.budget_s / 2
        )
        tasks_deadline = deadline - cfg.reserve_s
        sections = {
            "gemm": lambda: bench_gemm(cfg),
            "backbone": lambda: bench_backbone(cfg, prep),
            "many_tasks": lambda: bench_tasks(cfg, prep, scratch, tasks_deadline),
            "load": lambda: bench_load(cfg, prep),
            "training": lambda: bench_training(cfg, prep, deadline),
        }
        for name, fn in sections.items():
            if name in cfg.skip:
                continue
            if time.perf_counter() > deadline:
                why = f"the suite's time budget ({cfg.budget_s:.0f} s) was spent"
                results.setdefault("skipped_sections", {})[name] = why
                log.warning("section %s skipped: time budget spent", name)
                continue
            t0 = time.perf_counter()
            log.info("== %s", name)
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001  (recorded; the other sections still run)
                log.error("section %s failed: %s", name, e)
                results["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
                log.debug("%s", traceback.format_exc())
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    except Exception as e:  # noqa: BLE001  (preparation failed: nothing else can run; still write what we have)
        log.error("preparation failed: %s", e)
        results["errors"]["prepare"] = "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    results["seconds"] = round(time.time() - started, 1)
    write_report(results, cfg.out / ("suite_quick.json" if cfg.quick_mode else "suite.json"), cfg)
    return results


def write_report(results: dict, json_path: Path, cfg: SuiteConfig) -> None:
    """The summary (goals and ratios), then the results JSON, plots and markdown, all from ``results``."""
    from bench.report import summarize, write_markdown, write_plots

    results["summary"] = summarize(results)
    results.pop("files", None)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["files"] = {"json": str(json_path)}
    if cfg.plots:
        try:
            results["files"]["plots"] = [str(p) for p in write_plots(results, cfg.out)]
        except Exception as e:  # noqa: BLE001
            log.error("plots failed: %s", e)
            results.setdefault("errors", {})["plots"] = str(e)
    if cfg.markdown:
        write_markdown(results, Path(cfg.markdown), cfg.out)
        results["files"]["markdown"] = str(cfg.markdown)


__all__ = ["SECTIONS", "SuiteConfig", "run_suite", "write_report"]
