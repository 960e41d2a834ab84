"""The many-task serving bench on a GPU: one shared body vs one torch model per task, through the batcher.

    python -m bench.gpu_serving --backbone .whl/minilm-fp16 --out $OUT      # a lent GPU (see bench/gpu_check.py)
    python -m bench.gpu_serving --smoke                                     # tiny-bert on the CPU, seconds

What it does, in one process:

1. a repository: ``bit-xor`` with 24-bit strings (48 tokens a row, about MNIST's 49; generated data,
   nothing to download) trained a few steps on ``--backbone`` and exported (``--repo`` reuses one);
   N - 1 more tasks of its head shape are added as rows (``bench.many_tasks.build_task_levels``);
2. for N in ``--tasks`` (1, 100, 1,000): the shared body (``--runtime torch`` on ``--device``, the
   real ``ServingModel`` + ``DynamicBatcher`` + ``MixedBatchExecutor`` a server runs) under closed-loop
   load, one row a request, tasks drawn uniformly or by Zipf's law (s = 1.1), at each concurrency:
   rows/s, p50/p99 latency; start-up (repository to ready) and device memory after the levels;
3. the per-task contender at N <= ``--per-task-max``: each task its own copy of the body on the device
   (its norms baked in), behind the same batcher, a batch split into one call per task (what one
   model per task gets at best: every request of a task in the batch rides one call);
4. the raw body at batch 1/32/256 (``run_backbone``, host copies included, as served) and the torch
   answers against ONNX Runtime's on the same repository (labels, max |logits| difference).

``markdown(results)`` renders the section for BENCHMARKS.md with the goals checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.gpu_serving")
TASK = "bit-xor"
TASK_OPTIONS = {"n": 24, "train_size": 512, "test_size": 64}  # 48 tokens a row
GOALS = {
    "speedup_100_uniform": 10.0,  # shared body vs one model per task, rows/s, N = 100, uniform, top concurrency
    "memory_1000_vs_1": 1.2,  # device memory with 1,000 tasks loaded vs 1 (at most)
    "c256_vs_raw256": 0.8,  # shared body at top concurrency vs the raw body at the largest batch (at least)
}


@dataclass(kw_only=True)
class ServingBenchConfig:
    backbone: str = "minilm"
    repo: Path | None = None  # an exported repository holding TASK; None: train and export one
    device: str | None = None  # torch device; None: cuda if available
    precision: str = "fp32"
    cuda_graphs: bool = False
    tasks: tuple[int, ...] = (1, 100, 1000)
    traffic: tuple[str, ...] = ("uniform", "zipf")
    concurrency: tuple[int, ...] = (1, 32, 256)
    seconds: float = 3.0  # per level
    per_task_max: int = 100  # the per-task contender runs up to this N
    raw_batches: tuple[int, ...] = (1, 32, 256)
    max_batch_size: int = 256
    max_queue_delay_ms: float = 2.0
    train_steps: int = 20
    scratch: Path | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def smoke(cls, **kw) -> ServingBenchConfig:
        """Tiny sizes on the CPU: every code path in seconds (tests/bench/test_gpu_serving.py)."""
        values = dict(
            backbone="tiny-bert",
            device="cpu",
            tasks=(1, 4, 12),
            concurrency=(1, 8),
            seconds=0.3,
            per_task_max=4,
            raw_batches=(1, 8),
            max_batch_size=8,
            train_steps=2,
        )
        return cls(**{**values, **kw})


# --- the repository ------------------------------------------------------------------------------------


def prepare_repository(cfg: ServingBenchConfig, scratch: Path) -> Path:
    """An exported repository with TASK on ``cfg.backbone``: ``cfg.repo``, or trained and exported here."""
    if cfg.repo is not None:
        return Path(cfg.repo)
    from fpt_deploy.export import ExportConfig, export_task
    from fpt_deploy.training import TrainConfig, train

    out = scratch / "checkpoint"
    train(
        TrainConfig(
            task=TASK,
            backbone=cfg.backbone,
            steps=cfg.train_steps,
            batch_size=16,
            out=out,
            task_options=TASK_OPTIONS,
            progress=False,
        )
    )
    repo = scratch / "repo"
    export_task(ExportConfig(checkpoints=[out / "best"], repo=repo, validation_rows=16))
    return repo


def task_rows(repo: Path, count: int, seed: int = 0) -> np.ndarray:
    """``count`` raw rows of TASK as a client sends them."""
    from fpt_deploy.artifacts import open_repository

    task = open_repository(repo).task(TASK)
    shape, dtype = (count, *task.input["shape"][1:]), np.dtype(task.input["dtype"])
    return np.random.default_rng(seed).integers(0, 2, shape).astype(dtype)


# --- load -------------------------------------------------------------------------------------------------


def closed_loop(submit, names: list[str], kind: str, concurrency: int, seconds: float, rows: np.ndarray) -> dict:
    """``concurrency`` clients, each sending one row and waiting for the answer, for ``seconds``."""
    from bench.many_tasks import traffic

    rng = np.random.default_rng(concurrency)
    plan = traffic(names, kind, max(4096, concurrency * 64), rng)
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    errors: list[str] = []

    def client(k: int) -> None:
        mine, i = [], k
        while not mine or time.perf_counter() < stop:  # one request at least, however late it starts
            name, x = plan[i % len(plan)], rows[i % len(rows)][None]
            t0 = time.perf_counter()
            try:
                submit(name, x).result(60)
            except Exception as e:  # noqa: BLE001  (reported, the level goes on)
                errors.append(f"{type(e).__name__}: {e}")
                return
            mine.append(time.perf_counter() - t0)
            i += concurrency
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {
        "rows_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(ms[len(ms) // 2], 2) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2) if ms else None,
        "requests": len(ms),
        **({"errors": errors[:3]} if errors else {}),
    }


def _device_memory(torch, device) -> dict:
    if device.type != "cuda":
        import psutil

        return {"rss_mb": round(psutil.Process().memory_info().rss / 1e6, 1)}
    torch.cuda.synchronize(device)
    return {
        "allocated_mb": round(torch.cuda.memory_allocated(device) / 1e6, 1),
        "reserved_mb": round(torch.cuda.memory_reserved(device) / 1e6, 1),
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 1e6, 1),
    }


def _reset_peak(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class OwnBodies:
    """The per-task contender's runtime: one copy of the body per task on the device, its norms baked in."""

    name = "per-task"

    def __init__(self, shared, tasks: dict) -> None:
        self.shared = shared
        self.bodies = {}
        for task in tasks.values():
            w = shared.norm_weight[task.index : task.index + 1]
            b = shared.norm_bias[task.index : task.index + 1]
            self.bodies[task.index] = (copy.deepcopy(shared.body), shared.device_tables(w, b))

    def run_backbone(self, hidden, attention_mask, task_index):
        torch = self.shared._torch
        out = np.empty(hidden.shape, np.float32)
        for index in np.unique(task_index):  # one call per task: its own model
            rows = np.flatnonzero(task_index == index)
            body, (w, b) = self.bodies[int(index)]
            with torch.inference_mode():
                h = torch.from_numpy(np.ascontiguousarray(hidden[rows])).to(self.shared.device, self.shared.dtype)
                m = torch.from_numpy(np.ascontiguousarray(attention_mask[rows])).to(self.shared.device)
                n = len(rows)
                y = body(h, m, w.expand(n, -1, -1), b.expand(n, -1, -1))
                out[rows] = y.float().cpu().numpy()
        return out


def serve_level(cfg: ServingBenchConfig, repo: Path, names: list[str], rows: np.ndarray, per_task: bool) -> dict:
    """Every traffic x concurrency level of one contender on the repository ``repo`` of N tasks."""
    import torch
    from fpt_deploy.serving import DynamicBatcher, MixedBatchExecutor, RuntimeConfig, ServingModel

    config = RuntimeConfig(
        repo=repo,
        runtime="torch",
        device=cfg.device,
        precision=cfg.precision,
        cuda_graphs=cfg.cuda_graphs and not per_task,
        max_batch_size=cfg.max_batch_size,
    )
    from fpt_deploy.serving.runtimes.torch_runtime import resolve_device

    device = resolve_device(torch, cfg.device)
    _reset_peak(torch, device)
    t0 = time.perf_counter()
    model = ServingModel(config)
    runtime = OwnBodies(model.runtime, model.tasks) if per_task else model.runtime
    startup = time.perf_counter() - t0
    out: dict = {"startup_s": round(startup, 2), "memory_loaded": _device_memory(torch, device), "levels": {}}
    executor = MixedBatchExecutor(runtime, pad_tolerance=config.pad_tolerance)
    batcher = DynamicBatcher(executor, max_batch_size=cfg.max_batch_size, max_queue_delay_ms=cfg.max_queue_delay_ms,
                             max_queue_size=max(1024, 4 * max(cfg.concurrency)))  # fmt: skip
    try:

        def submit(name, x):
            return batcher.submit(model.tasks[name], x)

        closed_loop(submit, names, "uniform", max(cfg.concurrency), min(1.0, cfg.seconds), rows)  # warm-up
        for kind in cfg.traffic:
            for c in cfg.concurrency:
                level = closed_loop(submit, names, kind, c, cfg.seconds, rows)
                out["levels"][f"{kind} c={c}"] = level
                log.info("%s N=%d %s c=%d: %s", "per-task" if per_task else "shared", len(names), kind, c, level)
        out["memory_after"] = _device_memory(torch, device)
    finally:
        batcher.close()
        model.close()
        runtime = None  # the per-task copies go now, before the next contender measures its memory
        _reset_peak(torch, device)
    return out


def raw_body(cfg: ServingBenchConfig, repo: Path) -> dict:
    """Rows/s of ``run_backbone`` alone at each batch (48-token rows, mixed task indices, host copies in)."""
    from fpt_deploy.serving import RuntimeConfig, ServingModel

    model = ServingModel(RuntimeConfig(repo=repo, runtime="torch", device=cfg.device, precision=cfg.precision,
                                       cuda_graphs=cfg.cuda_graphs))  # fmt: skip
    try:
        rt = model.runtime
        task = model.tasks[TASK]
        x = task_rows(repo, max(cfg.raw_batches))
        hidden, mask = task.run_input_head(x)
        out = {}
        for b in cfg.raw_batches:
            args = (hidden[:b], mask[:b], np.full(b, task.index, np.int64))
            for _ in range(3):
                rt.run_backbone(*args)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < min(1.0, cfg.seconds) or calls < 3:
                rt.run_backbone(*args)
                calls += 1
            out[b] = round(b * calls / (time.perf_counter() - start), 1)
        return {"length": int(hidden.shape[1]), "rows_per_s": out}
    finally:
        model.close()


def torch_vs_ort(cfg: ServingBenchConfig, repo: Path) -> dict:
    """The torch runtime's answers against ONNX Runtime's (CPU) on the same rows: labels and logits."""
    from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServingModel
    from fpt_deploy.serving.executor import InferenceRequest
    from fpt_deploy.serving.runtimes.torch_runtime import PARITY_ATOL

    x = task_rows(repo, 64, seed=7)
    answers = {}
    for runtime in ("ort", "torch"):
        extra = {"device": cfg.device, "precision": cfg.precision} if runtime == "torch" else {}
        model = ServingModel(RuntimeConfig(repo=repo, runtime=runtime, **extra))
        try:
            (result,) = MixedBatchExecutor(model.runtime).run([InferenceRequest(model.tasks[TASK], x)])
            answers[runtime] = result.logits
        finally:
            model.close()
    diff = float(np.abs(answers["torch"] - answers["ort"]).max())
    return {
        "rows": len(x),
        "labels_equal": bool((answers["torch"].argmax(-1) == answers["ort"].argmax(-1)).all()),
        "max_abs_logits_diff": diff,
        "guard": PARITY_ATOL[cfg.precision],
        "within_guard": diff <= PARITY_ATOL[cfg.precision],
    }


def ort_cuda_section(cfg: ServingBenchConfig, repo: Path) -> dict:
    """``--runtime ort-cuda`` on the same repository: its answers against ort's and its raw rows/s; skipped
    (saying why) where this onnxruntime has no CUDA provider."""
    from fpt_deploy.serving import MixedBatchExecutor, RuntimeConfig, ServingModel
    from fpt_deploy.serving.executor import InferenceRequest

    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed here"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (not onnxruntime-gpu)"}
    x = task_rows(repo, max(cfg.raw_batches), seed=7)
    answers, out = {}, {"onnxruntime": ort.__version__}
    for runtime in ("ort", "ort-cuda"):
        model = ServingModel(RuntimeConfig(repo=repo, runtime=runtime))
        try:
            task = model.tasks[TASK]
            (result,) = MixedBatchExecutor(model.runtime).run([InferenceRequest(task, x)])
            answers[runtime] = result.logits
            if runtime == "ort-cuda":
                hidden, mask = task.run_input_head(x)
                rates = {}
                for b in cfg.raw_batches:
                    args = (hidden[:b], mask[:b], np.full(b, task.index, np.int64))
                    model.runtime.run_backbone(*args)
                    calls, start = 0, time.perf_counter()
                    while time.perf_counter() - start < min(1.0, cfg.seconds) or calls < 3:
                        model.runtime.run_backbone(*args)
                        calls += 1
                    rates[b] = round(b * calls / (time.perf_counter() - start), 1)
                out["rows_per_s"] = rates
        finally:
            model.close()
    out["labels_equal"] = bool((answers["ort"].argmax(-1) == answers["ort-cuda"].argmax(-1)).all())
    out["max_abs_logits_diff_vs_ort"] = float(np.abs(answers["ort"] - answers["ort-cuda"]).max())
    return out


def run_serving_bench(cfg: ServingBenchConfig) -> dict:
    import torch
    from fpt_deploy.serving.runtimes.torch_runtime import resolve_device

    from bench.many_tasks import build_task_levels

    device = resolve_device(torch, cfg.device)
    scratch = Path(cfg.scratch or tempfile.mkdtemp(prefix="fpt-gpu-serving-"))
    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    repo = prepare_repository(cfg, scratch)
    results["prepare_s"] = round(time.perf_counter() - t0, 1)
    levels = build_task_levels(repo, TASK, list(cfg.tasks), scratch / "levels")
    rows = task_rows(repo, 512)
    results["raw_body"] = raw_body(cfg, repo)
    results["torch_vs_ort"] = torch_vs_ort(cfg, repo)
    results["ort_cuda"] = ort_cuda_section(cfg, repo)
    results["shared"], results["per_task"] = {}, {}
    for n, (level_repo, names) in sorted(levels.items()):
        results["shared"][n] = serve_level(cfg, level_repo, names, rows, per_task=False)
        if n <= cfg.per_task_max:
            results["per_task"][n] = serve_level(cfg, level_repo, names, rows, per_task=True)
    results["goals"] = goals(results, cfg)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if cfg.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mb(point: dict) -> float | None:
    mem = point.get("memory_after") or {}
    return mem.get("peak_allocated_mb") or mem.get("rss_mb")


def goals(results: dict, cfg: ServingBenchConfig) -> dict:
    """Each goal of the GPU section: its measured value, its target, and whether it is met."""
    top, mid, big = max(cfg.concurrency), sorted(cfg.tasks)[len(cfg.tasks) // 2], max(cfg.tasks)
    out = {}
    shared, per_task = results["shared"], results["per_task"]
    key = f"uniform c={top}"
    if mid in shared and mid in per_task:
        a, b = shared[mid]["levels"][key]["rows_per_s"], per_task[mid]["levels"][key]["rows_per_s"]
        value = a / b if b else None
        out["speedup_100_uniform"] = {"what": f"N={mid} uniform c={top}: shared / per-task rows/s", "value": value,
                                      "target": f">= {GOALS['speedup_100_uniform']}"}  # fmt: skip
    small, large = _memory_mb(shared.get(min(cfg.tasks), {})), _memory_mb(shared.get(big, {}))
    if small and large:
        out["memory_1000_vs_1"] = {"what": f"device memory N={big} / N={min(cfg.tasks)} (peak allocated)",
                                   "value": large / small, "target": f"<= {GOALS['memory_1000_vs_1']}"}  # fmt: skip
    raw = results["raw_body"]["rows_per_s"].get(max(cfg.raw_batches))
    if raw and mid in shared:
        out["c256_vs_raw256"] = {"what": f"shared N={mid} uniform c={top} / raw body at batch {max(cfg.raw_batches)}",
                                 "value": shared[mid]["levels"][key]["rows_per_s"] / raw,
                                 "target": f">= {GOALS['c256_vs_raw256']}"}  # fmt: skip
    parity = results["torch_vs_ort"]
    out["torch_vs_ort"] = {"what": "torch vs ort, same repository: labels equal, logits within the guard",
                           "value": parity["max_abs_logits_diff"], "target": f"<= {parity['guard']}, labels equal",
                           "met": parity["labels_equal"] and parity["within_guard"]}  # fmt: skip
    for name, goal in out.items():
        if "met" not in goal:
            v = goal["value"]
            goal["met"] = v is not None and (v <= GOALS[name] if name == "memory_1000_vs_1" else v >= GOALS[name])
    return out


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(results: dict) -> str:
    """The GPU section for BENCHMARKS.md: goals, then every level of both contenders."""
    cfg = results["config"]
    lines = [
        f"## Many tasks on a GPU ({results['device']}; host CPU {results['cpu']})",
        "",
        f"`python -m bench.gpu_check` (serving section): torch {results['torch']}, body `{cfg['backbone']}` "
        f"{cfg['precision']}{' + CUDA graphs' if cfg['cuda_graphs'] else ''}, task {TASK} (48-token rows), "
        f"one row a request, closed loop, {cfg['seconds']} s a level, max batch {cfg['max_batch_size']}.",
        "",
        "| goal | measured | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for goal in results["goals"].values():
        lines.append(
            f"| {goal['what']} | {_f(goal['value'], 3)} | {goal['target']} | {'yes' if goal['met'] else 'NO'} |"
        )
    raw = results["raw_body"]
    lines += ["", f"Raw body (`run_backbone`, {raw['length']} tokens, host copies included), rows/s: "
              + ", ".join(f"batch {b}: {_f(v)}" for b, v in raw["rows_per_s"].items()), ""]  # fmt: skip
    ort_cuda = results.get("ort_cuda", {})
    if "skipped" in ort_cuda:
        lines += [f"ort-cuda: not measured, {ort_cuda['skipped']}.", ""]
    elif ort_cuda:
        lines += [f"ort-cuda (onnxruntime {ort_cuda['onnxruntime']}) raw body rows/s: "
                  + ", ".join(f"batch {b}: {_f(v)}" for b, v in ort_cuda["rows_per_s"].items())
                  + f"; labels equal to ort: {ort_cuda['labels_equal']}, max |logits diff| "
                  f"{ort_cuda['max_abs_logits_diff_vs_ort']:.3g}.", ""]  # fmt: skip
    for line in results.get("notes", []):
        lines += [line, ""]
    lines += [
        "| contender | N | start-up s | memory MB | traffic | c | rows/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for contender in ("shared", "per_task"):
        for n, point in results[contender].items():
            for level, r in point["levels"].items():
                kind, c = level.split(" c=")
                lines.append(
                    f"| {contender.replace('_', '-')} | {n} | {point['startup_s']} | {_f(_memory_mb(point))} | {kind} "
                    f"| {c} | {_f(r['rows_per_s'])} | {_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny-bert on the CPU, tiny sizes: every path in seconds")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--repo", type=Path, default=None, help="an exported repository holding bit-xor")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_serving.json and gpu_serving.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {k: v for k, v in vars(args).items() if k in ("backbone", "repo", "device", "precision", "seconds")}
    given = {k: v for k, v in given.items() if v is not None} | ({"cuda_graphs": True} if args.cuda_graphs else {})
    cfg = ServingBenchConfig.smoke(**given) if args.smoke else ServingBenchConfig(**given)
    results = run_serving_bench(cfg)
    write_outputs(results, args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None))
    return results


def write_outputs(results: dict, out: Path | None) -> None:
    text = markdown(results)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_serving.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_serving.md").write_text(text)


if __name__ == "__main__":
    main()
