"""The ``many_tasks`` section: N = 1, 10, 100, 1,000 tasks on one server, where sharing the backbone matters.

Each level serves N MNIST-shaped tasks: the real task and N - 1 of its head shape with random weights
(``export.heads.write_task_from_rows``: rows, not graphs), one real held-out row a request, the
requests spread over the tasks uniformly or by Zipf's law with s = 1.1 (a few hot tasks, a long
tail), at concurrency 1, 8 and 32. For each contender and N: start-up time (process start to ready),
rows/s, p50/p99, and resident memory after the levels.

Contenders: the fpt-deploy server (fp32, int8 backbone), the fp32 server with
``--max-resident-tasks`` (``fpt-deploy fp32 paged``, at the N above that bound only: below it, it is
the fp32 server), and the per-task baselines (``bench.baseline_server``: one whole model per task).
A per-task server is started at N only while its memory and start-up time, projected linearly from
the smaller N it was measured at, stay within ``SuiteConfig.per_task_max_rss_gb`` and
``per_task_max_startup_s``; where it stops, the reason is recorded.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.backbone import backbone_rows, raw_rate
from bench.config import FPT_FP32, FPT_PAGED, FPT_PREFIX, ORT_PER_TASK, TORCH_PER_TASK, SuiteConfig
from bench.prepare import Prepared
from bench.serve_load import binary_request, load
from bench.server_process import ServerProcess
from bench.servers import baseline_server, fpt_server

log = logging.getLogger("bench.tasks")
TRAFFIC = ("uniform", "zipf")
ZIPF_S = 1.1


def traffic(names: list[str], kind: str, count: int, rng) -> list[str]:
    """``count`` task names drawn uniformly, or with P(rank k) proportional to 1 / k^1.1 (``zipf``)."""
    if kind == "uniform":
        p = np.full(len(names), 1.0 / len(names))
    elif kind == "zipf":
        p = 1.0 / np.arange(1, len(names) + 1) ** ZIPF_S
        p /= p.sum()
    else:
        raise ValueError(f"traffic must be one of {', '.join(TRAFFIC)} (got {kind!r})")
    return [names[i] for i in rng.choice(len(names), size=count, p=p)]


def _link(src: Path, dst: Path) -> None:
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def build_task_levels(repo: Path, task: str, counts: list[int], dest: Path) -> dict[int, tuple[Path, list[str]]]:
    """One repository per N in ``counts`` (files shared through links): ``task`` plus N - 1 of its shape."""
    from fpt_deploy.export.heads import write_task_from_rows

    from fpt_deploy.artifacts import BACKBONES_DIR, HEADS_DIR, TASKS_DIR, Repository, open_repository, task_dir

    source = open_repository(repo)
    like = source.tasks[task]
    if not like.heads:
        raise ValueError(f"task {task!r} of {repo} has no shared head graphs (format /1); re-export it")
    pool = dest / "tasks-pool"  # every generated task once
    pool.mkdir(parents=True)
    generated = Repository(root=pool)
    rows, norms = like.load_head_rows(repo), like.load_norms(repo)
    rng = np.random.default_rng(0)
    names = [task]
    for k in range(1, max(counts)):
        noisy = {n: r + rng.standard_normal(r.shape, dtype=np.float32) * 0.02 for n, r in rows.items()}
        write_task_from_rows(generated, like, f"{task}-{k:04d}", noisy, norms)
        names.append(f"{task}-{k:04d}")
    out = {}
    for n in counts:
        root = dest / f"n{n}"
        (root / TASKS_DIR).mkdir(parents=True)
        for folder in (BACKBONES_DIR, HEADS_DIR):
            _link(repo / folder, root / folder)
        level = Repository(root=root, backbones=dict(source.backbones), heads=dict(source.heads))
        for name in names[:n]:
            _link((repo if name == task else pool) / task_dir(name), root / task_dir(name))
            level.tasks[name] = source.tasks[task] if name == task else generated.tasks[name]
        level.save_manifest()
        out[n] = (root, names[:n])
    return out


def _bodies(names: list[str], kind: str, rows: np.ndarray, count: int, seed: int) -> list[tuple[str, bytes, dict]]:
    rng = np.random.default_rng(seed)
    return [
        (name, *binary_request(rows[i % len(rows)][None])) for i, name in enumerate(traffic(names, kind, count, rng))
    ]


_STAGE = re.compile(r'^fpt_(compute|queue)_seconds_(sum|count)(?:\{stage="(\w+)"\})? (\S+)$', re.M)


def server_stages(port: int) -> dict[str, list[float]]:
    """The server's cumulative time by stage (``/metrics``): stage -> [seconds, count]; {} without one."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    totals: dict[str, list[float]] = {}
    for kind, field, stage, value in _STAGE.findall(text):
        totals.setdefault(stage or kind, [0.0, 0.0])[field == "count"] = float(value)
    return totals


def _stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean ms of each stage between two ``server_stages`` readings (a batch's, or a request's queue)."""
    means = {}
    for stage, (seconds, count) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = 1000 * (seconds - s0) / (count - c0)
    return means


def _measure_server(
    start,
    names: list[str],
    rows: np.ndarray,
    cfg,
    deadline: float,
    levels: list[tuple[str, int]],
    extra_level=None,
    stages: bool = False,
) -> dict:
    """Start a server (``start()`` -> ServerProcess), time its start-up, run ``levels``, take its RSS."""
    t0 = time.perf_counter()
    server: ServerProcess = start()
    try:
        server.wait_ready()
        startup = time.perf_counter() - t0
        bodies = {
            kind: _bodies(names, kind, rows, max(cfg.tasks_requests_cycled, len(names)), seed=i)
            for i, kind in enumerate(TRAFFIC)
        }
        warm = load(server.port, bodies["uniform"], 8, max_requests=min(len(names), 256) + 64, max_seconds=30)
        measured = []
        for kind, c in levels:
            if time.perf_counter() > deadline:
                measured.append({"traffic": kind, "concurrency": c, "skipped": "time budget"})
                continue
            before = server_stages(server.port) if stages else {}
            level = load(server.port, bodies[kind], c, cfg.level_requests, cfg.tasks_level_seconds)
            level["traffic"] = kind
            if stages:  # where a request's time went in the server: queue, heads, body (mean ms)
                level["server_ms"] = _stage_means(before, server_stages(server.port))
            if extra_level is not None:
                level |= extra_level(kind, c)
            measured.append(level)
            log.info(
                "  %-7s c=%-3d %7.1f rows/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
                kind,
                c,
                level["rows_per_s"],
                level["p50_ms"] or 0,
                level["p99_ms"] or 0,
                level["errors"],
            )
        rss = server.rss_mb()
    finally:
        server.stop()
    return {"startup_s": startup, "rss_mb": rss, "warm_errors": warm["errors"], "levels": measured}


def _interleaved(starts: dict, bodies: dict, concurrency: int, rounds: int, seconds: float, requests: int) -> dict:
    """Servers started together, their levels alternated round by round: a busy minute hits each alike.

    ``starts`` maps a label to a ``start()``, ``bodies`` the label to its requests. Returns each label's
    rows/s per round and their median.
    """
    servers = {}
    try:
        for label, start in starts.items():
            servers[label] = start()
        for label, server in servers.items():
            server.wait_ready()
            load(server.port, bodies[label], concurrency, max_requests=4 * concurrency, max_seconds=10)  # warm-up
        rates: dict[str, list[float]] = {label: [] for label in servers}
        for _ in range(rounds):
            for label, server in servers.items():
                rates[label].append(load(server.port, bodies[label], concurrency, requests, seconds)["rows_per_s"])
    finally:
        for server in servers.values():
            server.stop()
    return {label: {"rows_per_s": r, "median": float(np.median(r))} for label, r in rates.items()}


def _projection(points: list[dict], n: int) -> tuple[float, float] | None:
    """(RSS MB, start-up s) at ``n`` tasks, linear through the two largest measured N; None below two."""
    measured = [p for p in points if "rss_mb" in p]
    if len(measured) < 2:
        return None
    a, b = measured[-2], measured[-1]
    dn = b["tasks"] - a["tasks"]
    slope_rss, slope_s = (b["rss_mb"] - a["rss_mb"]) / dn, (b["startup_s"] - a["startup_s"]) / dn
    return b["rss_mb"] + slope_rss * (n - b["tasks"]), b["startup_s"] + slope_s * (n - b["tasks"])


def bench_tasks(cfg: SuiteConfig, prep: Prepared, scratch: Path, deadline: float) -> dict:
    """Every contender at every N (see the module docstring); contenders that stop say why."""
    from fpt_deploy.serving.runtimes.ort import OrtRuntime
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    from fpt_deploy.artifacts import open_repository

    counts = sorted(cfg.task_counts)
    t0 = time.perf_counter()
    repos = build_task_levels(prep.repo, prep.task, counts, scratch / "task-levels")
    built_s = time.perf_counter() - t0
    log.info("built %s task repositories in %.1f s", ", ".join(map(str, counts)), built_s)
    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    weight, bias = art.load_norms(r.root)
    threads = cfg.threads or physical_cores()
    runtime = OrtRuntime(r.backbones[art.fingerprint].path(r.root, "fp32"), weight[None], bias[None], threads=threads)
    raw_rows = {b: backbone_rows(prep, b) for b in sorted({min(c, cfg.max_batch_size) for c in cfg.concurrency})}

    def raw_ceiling(kind: str, c: int) -> dict:
        """The raw fp32 backbone at this level's batch, timed right after it (same minute)."""
        batch = min(c, cfg.max_batch_size)
        hidden, mask = raw_rows[batch]
        index = np.zeros(batch, np.int64)
        rate = raw_rate(lambda: runtime.run_backbone(hidden, mask, index), batch, cfg.raw_seconds_in_load)
        return {"raw_backbone_rows_per_s": rate, "raw_backbone_batch": batch}

    # In order of what the goals need, so a spent time budget cuts the least telling measurements.
    contenders = {FPT_FP32: ("fpt", "fp32")}
    if any(n > cfg.max_resident_tasks for n in counts):
        contenders[FPT_PAGED] = ("fpt", "fp32")
    if prep.full_onnx:
        contenders[ORT_PER_TASK] = ("ort", prep.full_onnx)
    contenders |= {f"{FPT_PREFIX}{v}": ("fpt", v) for v in prep.variants if v != "fp32"}
    contenders[TORCH_PER_TASK] = ("torch", prep.checkpoint)
    every_level = [(kind, c) for kind in TRAFFIC for c in cfg.concurrency]
    goal_level = [("uniform", max(cfg.concurrency))]  # per-task servers beyond baseline_full_levels_tasks
    out: dict = {
        "counts": counts,
        "traffic": list(TRAFFIC),
        "zipf_s": ZIPF_S,
        "build_seconds": built_s,
        "max_resident_tasks": cfg.max_resident_tasks,
        "contenders": {},
        "stopped": {},
    }
    try:
        for name, (kind, source) in contenders.items():
            points = []
            for n in counts:
                root, names = repos[n]
                why = None
                projected = _projection(points, n) if kind != "fpt" else None
                if name == FPT_PAGED and n <= cfg.max_resident_tasks:
                    continue  # every task resident: the fp32 server's own measurement
                if time.perf_counter() > deadline:
                    why = "time budget of the suite spent"
                elif projected and projected[0] > cfg.per_task_max_rss_gb * 1024:
                    why = f"projected RSS {projected[0] / 1024:.1f} GB > {cfg.per_task_max_rss_gb:g} GB"
                elif projected and projected[1] > cfg.per_task_max_startup_s:
                    why = f"projected start-up {projected[1]:.0f} s > {cfg.per_task_max_startup_s:g} s"
                elif kind != "fpt" and n > cfg.per_task_max_tasks:
                    why = f"more than {cfg.per_task_max_tasks} tasks (per_task_max_tasks)"
                if why:
                    out["stopped"][name] = {"at_tasks": n, "reason": why}
                    log.info("%s stops at N=%d: %s", name, n, why)
                    break
                log.info("== %s, N=%d", name, n)
                if kind == "fpt":
                    resident = cfg.max_resident_tasks if name == FPT_PAGED else None
                    start = lambda root=root, v=source, k=resident: fpt_server(root, v, cfg, k)  # noqa: E731
                else:
                    start = lambda names=names, k=kind, s=source: baseline_server(k, dict.fromkeys(names, s), cfg)  # noqa: E731
                extra = raw_ceiling if name == FPT_FP32 and n == counts[0] else None
                levels = every_level if kind == "fpt" or n <= cfg.baseline_full_levels_tasks else goal_level
                point = _measure_server(start, names, prep.rows, cfg, deadline, levels, extra, stages=kind == "fpt")
                point["tasks"] = n
                points.append(point)
                log.info("%s N=%d: start-up %.1f s, RSS %.0f MB", name, n, point["startup_s"], point["rss_mb"])
            out["contenders"][name] = points
        mid = 100 if 100 in counts else counts[-1]
        if cfg.goal_rounds and mid != counts[0] and time.perf_counter() < deadline:
            # The goal "N tasks vs one task" divides two cells measured minutes apart; measured again here,
            # both servers up, their levels alternated, so a noisy neighbour weighs on both.
            c = max(cfg.concurrency)
            pair = {n: repos[n] for n in (counts[0], mid)}
            log.info("== fpt-deploy fp32, N=%d and N=%d interleaved, uniform c=%d", counts[0], mid, c)
            out["interleaved"] = {
                "concurrency": c,
                "rounds": cfg.goal_rounds,
                "seconds": cfg.tasks_level_seconds,
                "servers": _interleaved(
                    {n: (lambda root=root: fpt_server(root, "fp32", cfg)) for n, (root, _) in pair.items()},
                    {
                        n: _bodies(names, "uniform", prep.rows, cfg.tasks_requests_cycled, 0)
                        for n, (_, names) in pair.items()
                    },
                    c,
                    cfg.goal_rounds,
                    cfg.tasks_level_seconds,
                    cfg.level_requests,
                ),
            }
            for n, figures in out["interleaved"]["servers"].items():
                log.info("  N=%d: %s rows/s", n, ", ".join(f"{r:.1f}" for r in figures["rows_per_s"]))
    finally:
        runtime.close()
        shutil.rmtree(scratch / "task-levels", ignore_errors=True)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def find_level(results: dict, contender: str, tasks: int, kind: str, c: int) -> dict | None:
    for point in results.get("contenders", {}).get(contender, []):
        if point["tasks"] == tasks:
            return next(
                (
                    lv
                    for lv in point["levels"]
                    if lv["traffic"] == kind and lv["concurrency"] == c and "rows_per_s" in lv
                ),
                None,
            )
    return None


def find_point(results: dict, contender: str, tasks: int) -> dict | None:
    return next((p for p in results.get("contenders", {}).get(contender, []) if p["tasks"] == tasks), None)


__all__ = ["TRAFFIC", "bench_tasks", "build_task_levels", "find_level", "find_point", "traffic"]
