"""The ``load`` section: four servers on 127.0.0.1, all driven by the same closed-loop load generator.

``bench.serve_load.load``: one MNIST row a request in the binary KServe v2 format, tasks mixed
round-robin, concurrency 1, 8, 32, a bounded number of requests and seconds per level. Contenders: the
fpt-deploy server (fp32 and int8 backbone), "torch per task" and "ort per task"
(``bench.baseline_server``: one complete model per task, what a user without fpt-deploy writes).
``load_rounds`` rounds, each over every level of every contender, so a burst of load elsewhere hits
all of them; a level's figures are the mean of its rounds. Right after each fpt-deploy level the raw
backbone is timed again at that level's batch: the ceiling "/ raw backbone" divides by.
"""

from __future__ import annotations

import logging

import numpy as np

from bench.backbone import backbone_rows, raw_rate
from bench.config import FPT_PREFIX, ORT_PER_TASK, TORCH_PER_TASK, SuiteConfig
from bench.prepare import Prepared
from bench.serve_load import binary_request, load
from bench.server_process import ServerProcess
from bench.servers import baseline_server, fpt_server, start_all

log = logging.getLogger("bench.load")


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
        servers[f"{FPT_PREFIX}{variant}"] = fpt_server(prep.mixed, variant, cfg)
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
        rows = {c: backbone_rows(prep, min(c, cfg.max_batch_size)) for c in cfg.concurrency}
        for k in range(cfg.load_rounds):
            for c in cfg.concurrency:
                batch = min(c, cfg.max_batch_size)
                hidden, mask = rows[c]
                index = np.zeros(batch, np.int64)
                for name, server in servers.items():
                    level = load(server.port, bodies, c, cfg.level_requests, cfg.level_seconds)
                    rounds[name][c].append(level)
                    extra = ""
                    variant = name.removeprefix(FPT_PREFIX) if name.startswith(FPT_PREFIX) else None
                    if variant in runtimes:
                        call = lambda rt=runtimes[variant]: rt.run_backbone(hidden, mask, index)  # noqa: E731
                        rate = raw_rate(call, batch, cfg.raw_seconds_in_load)
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
        for level in levels[f"{FPT_PREFIX}{variant}"]:
            rates = by_c[level["concurrency"]]
            level["raw_backbone_rows_per_s"] = sum(rates) / len(rates)
            level["raw_backbone_rounds"] = rates
    return {"tasks": prep.tasks, "requests_cycled": len(bodies), "rounds": cfg.load_rounds, "levels": levels}
