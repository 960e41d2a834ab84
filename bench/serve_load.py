"""Load the real server on loopback and compare it with the raw backbone, measured in the same run.

    python -m bench.serve_load --repo deploy            # the real figures: a minilm repository
    python -m bench.serve_load                          # smoke: builds a tiny-bert repository first

What it prints (and writes as JSON with --out):
1. For concurrency 1, 8 and 32: closed-loop clients, one row a request, tasks mixed round-robin, each
   request the binary protocol as tritonclient sends it; throughput and p50/p99 latency; a bounded
   number of requests and seconds per level.
2. The raw backbone on ONNX Runtime (same threads, same rows-per-call as the server's batches could
   reach: 1, 8, 32) on the same row length, and the server's throughput as a fraction of it.
3. Resident memory (psutil RSS) of a warmed-up server with 1, 10 and 50 tasks: clones of one task's
   heads under new names in a temporary copy of the repository.

Everything runs on this machine's cores: the load generator competes with the server for them, as a
client on the same host would. Bounded throughout: every loop has a request and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.server_process import ROOT, ServerProcess

log = logging.getLogger("bench.serve_load")


def fpt_server(repo: Path, options: dict) -> ServerProcess:
    """``fpt-deploy serve`` on REPO with ``options`` (``ServeConfig`` names) in a child process, ready."""
    return ServerProcess.fpt_deploy(repo, quiet=True, **options)


def binary_request(x: np.ndarray) -> tuple[bytes, dict]:
    """Body and headers of a one-input binary request, exactly as tritonclient.http builds them."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": _triton(x.dtype),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def _triton(dtype) -> str:
    return {"uint8": "UINT8", "int64": "INT64", "float32": "FP32"}[np.dtype(dtype).name]


def task_inputs(repo: Path, tasks: list[str], rng) -> dict[str, np.ndarray]:
    """Random valid one-row inputs for each task, from its task.json."""
    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    out = {}
    for name in tasks:
        t = r.tasks[name]
        shape, dtype = [1, *t.input["shape"][1:]], np.dtype(t.input["dtype"])
        vocab = t.spec.vocab_size
        high = vocab if vocab else (2 if "bit" in t.spec.name else 256)
        out[name] = rng.integers(1 if vocab else 0, high, size=shape).astype(dtype)
    return out


def http_request(port: int, task: str, body: bytes, headers: dict) -> bytes:
    """The bytes of one keep-alive HTTP/1.1 POST to ``task``'s infer endpoint."""
    lines = [f"POST /v2/models/{task}/infer HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response framed by Content-Length (what both servers send)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = _CONTENT_LENGTH.search(head)
    if length is None:
        raise ValueError(f"response without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(int(length.group(1)))


def load(port: int, bodies: list[tuple[str, bytes, dict]], concurrency: int, max_requests: int, max_seconds: float):
    """Closed loop on 127.0.0.1: ``concurrency`` clients, each sending its next request when the last returned.

    Bounded by ``max_requests`` and ``max_seconds``; request ``n`` is ``bodies[n % len(bodies)]``.
    Failed requests are counted (with the first failure's text), never timed.

    The clients are coroutines on one asyncio loop writing pre-built requests (the bytes tritonclient
    sends) on keep-alive connections, like wrk or Triton's perf_analyzer: about 40 us of CPU a request,
    where 32 threads of ``http.client`` took about 160 us and 0.09 of this machine's 2 cores away from
    the server being measured.
    """
    requests = [http_request(port, *b) for b in bodies]
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    stop_at = time.perf_counter() + max_seconds

    async def client() -> None:
        nonlocal issued
        conn = None
        while time.perf_counter() < stop_at and issued < max_requests:
            raw = requests[issued % len(requests)]
            issued += 1
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                conn[1].write(raw)
                status, body = await asyncio.wait_for(_read_response(conn[0]), 60)
            except (TimeoutError, OSError, EOFError, ValueError) as e:  # IncompleteReadError is an EOFError
                errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if status != 200:
                errors.append(f"HTTP {status}: {body[:200]!r}")
                continue
            latencies.append(time.perf_counter() - t0)
        if conn is not None:
            conn[1].close()

    async def run() -> None:
        await asyncio.gather(*(client() for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99)) if len(lat) else (None, None)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": seconds,
        "rows_per_s": len(latencies) / seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_over_p50": p99 / p50 if p50 else None,
    }


def raw_backbone(
    repo: Path, variant: str, threads: int | None, length: int, batches: list[int], max_seconds: float
) -> dict[int, float]:
    """Rows/s of the backbone alone (ONNX Runtime, the server's session options), per batch size."""
    from fpt_deploy.serving.runtimes.ort import OrtRuntime

    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    b = next(iter(r.backbones.values()))
    d, n = b.hidden_size, b.num_norms
    runtime = OrtRuntime(
        b.path(r.root, variant), np.ones((1, n, d), np.float32), np.zeros((1, n, d), np.float32), threads=threads
    )
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        hidden = rng.standard_normal((batch, length, d)).astype(np.float32)
        mask = np.ones((batch, length), np.int64)
        index = np.zeros(batch, np.int64)
        runtime.run_backbone(hidden, mask, index)  # warm-up
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or (time.perf_counter() - t0 < max_seconds and calls < 10_000):
            runtime.run_backbone(hidden, mask, index)
            calls += 1
        out[batch] = calls * batch / (time.perf_counter() - t0)
    return out


_BACKBONE_RSS = """
import sys, numpy as np, psutil
from fpt_deploy.artifacts import open_repository
from fpt_deploy.serving.runtimes.ort import OrtRuntime
repo, variant, length, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = open_repository(repo)
b = next(iter(r.backbones.values()))
rss = lambda: psutil.Process().memory_info().rss
before = rss()
rt = OrtRuntime(b.path(r.root, variant), np.ones((1, b.num_norms, b.hidden_size), np.float32),
                np.zeros((1, b.num_norms, b.hidden_size), np.float32))
rt.run_backbone(np.zeros((batch, length, b.hidden_size), np.float32), np.ones((batch, length), np.int64),
                np.zeros(batch, np.int64))
print((rss() - before) / 2**20)
"""


def backbone_rss_mb(repo: Path, variant: str, length: int, batch: int) -> float:
    """Resident memory the backbone session adds to a process once it has run a full batch."""
    done = subprocess.run(
        [sys.executable, "-c", _BACKBONE_RSS, str(repo), variant, str(length), str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def clone_tasks(repo: Path, source: str, count: int, dest: Path) -> list[str]:
    """A copy of ``repo`` holding ``source`` plus ``count - 1`` clones of it under new names."""
    from fpt_deploy.artifacts import open_repository, task_dir, task_file, write_json

    shutil.copytree(repo, dest)
    r = open_repository(dest)
    for name in [t for t in r.tasks if t != source]:
        del r.tasks[name]
    base = r.tasks[source]
    names = [source]
    for k in range(1, count):
        name = f"{source}-clone{k}"
        folder = dest / task_dir(name)
        shutil.copytree(dest / task_dir(source), folder)
        files = {key: f"{task_dir(name)}/{Path(rel).name}" for key, rel in base.files.items()}
        clone = dataclasses.replace(base, name=name, files=files, spec=dataclasses.replace(base.spec, name=name))
        write_json(dest / task_file(name), clone.to_json())
        r.tasks[name] = clone
        names.append(name)
    r.save_manifest()
    return names


def memory(repo: Path, task: str, counts: list[int], serve_args: dict) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="fpt-mem-") as tmp:
            names = clone_tasks(repo, task, count, Path(tmp) / "repo")
            x = task_inputs(Path(tmp) / "repo", [task], rng)[task]
            with fpt_server(Path(tmp) / "repo", serve_args) as server:
                bodies = [(name, *binary_request(x)) for name in names]
                load(server.port, bodies, 4, max_requests=max(2 * count, 32), max_seconds=30)  # warm every task
                rows.append({"tasks": count, "rss_mb": server.rss_mb()})
        log.info("%d task(s): RSS %.1f MB", count, rows[-1]["rss_mb"])
    return rows


def build_smoke_repo(dest: Path) -> Path:
    """A tiny-bert repository (mnist and bit-xor, a few training steps): for smoke runs only."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import train_tiny
    from fpt_deploy.export import ExportConfig, export_task

    checkpoints = [train_tiny(dest / t, t) for t in ("mnist", "bit-xor")]
    export_task(ExportConfig(checkpoints=checkpoints, repo=dest / "repo", validation_rows=16))
    return dest / "repo"


def machine() -> dict:
    import onnxruntime
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, help="deployment repository (default: build a tiny-bert one: smoke only)")
    p.add_argument("--tasks", nargs="*", help="tasks to mix (default: --mix clones of the repository's first task)")
    p.add_argument("--mix", type=int, default=2, help="without --tasks: serve this many same-shape tasks (clones)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=2000, help="at most this many requests per concurrency level")
    p.add_argument("--seconds", type=float, default=20.0, help="at most this long per concurrency level")
    p.add_argument("--memory-tasks", type=int, nargs="*", default=[1, 10, 50])
    p.add_argument("--backbone-variant", default="fp32")
    p.add_argument("--threads", type=int, default=None, help="backbone intra-op threads (server and raw alike)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    scratch = Path(tempfile.mkdtemp(prefix="fpt-bench-"))
    try:
        repo = args.repo or build_smoke_repo(scratch)
        from fpt_deploy.artifacts import open_repository

        source = repo
        if not args.tasks:  # mixed tasks of one row shape (MNIST-shaped rows for an mnist repository)
            first = sorted(open_repository(source).tasks)[0]
            repo = scratch / "mixed"
            clone_tasks(source, first, args.mix, repo)
        r = open_repository(repo)
        tasks = args.tasks or sorted(r.tasks)
        inputs = task_inputs(repo, tasks, np.random.default_rng(0))
        serve_args = {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "backbone_variant": args.backbone_variant,
            "threads": args.threads or None,
        }
        bodies = [(t, *binary_request(inputs[t])) for t in tasks]
        with fpt_server(repo, serve_args) as server:
            load(server.port, bodies, 4, max_requests=64, max_seconds=10)  # warm-up
            levels = [load(server.port, bodies, c, args.requests, args.seconds) for c in args.concurrency]
        lengths = {r.tasks[t].spec.seq_len for t in tasks}
        length = max(lengths)
        batches = sorted({min(c, args.max_batch_size) for c in args.concurrency})
        raw = raw_backbone(repo, args.backbone_variant, args.threads, length, batches, max_seconds=5)
        for level in levels:
            ceiling = raw[min(level["concurrency"], args.max_batch_size)]
            level["raw_backbone_rows_per_s"] = ceiling
            level["server_over_raw"] = level["rows_per_s"] / ceiling
        mem = memory(source, tasks[0], args.memory_tasks, serve_args) if args.memory_tasks else []
        backbone = next(iter(r.backbones.values()))
        backbone_mb = backbone.path(r.root, args.backbone_variant).stat().st_size / 2**20
        backbone_rss = backbone_rss_mb(repo, args.backbone_variant, length, args.max_batch_size)
        result = {
            "machine": machine(),
            "repo": str(source),
            "backbone": backbone.name,
            "variant": args.backbone_variant,
            "tasks": tasks,
            "row_tokens": sorted(lengths),
            "load": levels,
            "raw_backbone_rows_per_s": raw,
            "memory": mem,
            "backbone_file_mb": backbone_mb,
            "backbone_rss_mb": backbone_rss,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"machine: {result['machine']}")
    print(
        f"backbone {result['backbone']} ({args.backbone_variant}, file {backbone_mb:.1f} MB, resident "
        f"{backbone_rss:.1f} MB once run), tasks {', '.join(tasks)}, "
        f"rows of {sorted(lengths)} tokens, max batch {args.max_batch_size}, delay {args.max_queue_delay_ms} ms"
    )
    print(
        f"{'conc':>5} {'requests':>8} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
        f"{'raw rows/s':>10} {'server/raw':>10}"
    )
    for lv in levels:
        print(
            f"{lv['concurrency']:>5} {lv['requests']:>8} {lv['rows_per_s']:>9.1f} {lv['p50_ms']:>8.2f} "
            f"{lv['p99_ms']:>8.2f} {lv['p99_over_p50']:>7.2f} {lv['raw_backbone_rows_per_s']:>10.1f} "
            f"{lv['server_over_raw']:>10.2f}"
        )
    if mem:
        base = mem[0]["rss_mb"]
        for m in mem:
            extra = (m["rss_mb"] - base) / (m["tasks"] - mem[0]["tasks"]) if m["tasks"] > mem[0]["tasks"] else 0.0
            print(
                f"RSS with {m['tasks']:>3} task(s): {m['rss_mb']:7.1f} MB ({m['rss_mb'] / base:.3f}x of "
                f"{mem[0]['tasks']}); {extra:.3f} MB per added task = "
                f"{100 * extra / backbone_rss:.2f}% of the backbone's resident memory"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
