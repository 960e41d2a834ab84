"""The suite's contenders as server processes: the fpt-deploy server and the per-task baselines."""

from __future__ import annotations

from pathlib import Path

from bench.config import FPT_PREFIX, SuiteConfig
from bench.server_process import ServerProcess, free_port


def fpt_server(repo: Path, variant: str, cfg: SuiteConfig, max_resident_tasks: int | None = None) -> ServerProcess:
    """``fpt-deploy serve`` on ``repo`` with the suite's batching settings, started (``wait_ready`` it)."""
    return ServerProcess.fpt_deploy(
        repo,
        name=f"{FPT_PREFIX}{variant}",
        quiet=True,
        wait=False,
        backbone_variant=variant,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_ms=cfg.max_queue_delay_ms,
        max_resident_tasks=max_resident_tasks,
        threads=cfg.threads,
    )


def baseline_server(runtime: str, models: dict[str, Path], cfg: SuiteConfig) -> ServerProcess:
    """``bench.baseline_server``: one whole model per task on ``runtime``, started (``wait_ready`` it)."""
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
