"""A task added and removed under load: does any request of another task fail or stall?

    python -m bench.live_load                     # 16 clients on bit-xor for 60 s
    python -m bench.live_load --clients 8 --seconds 20 --out bench/results/live_load.json

The server (``fpt-deploy serve --model-control-mode explicit``) starts with task A (bit-xor). Closed-loop
clients send A one-row requests for the whole run. A quarter of the way in, task B (bit-memory) is
exported into the served repository (``fpt-deploy export`` in its own process), loaded
(``POST /v2/repository/models/B/load``), queried, and unloaded (``.../unload``). Reported per window
(before; while B's export runs; from B's load to its unload; after): A's requests, failures and
p50/p99 latency; and the server's resident memory before and after.

The export competes with the server for this machine's cores: its window measures that, while the
load-to-unload window measures the server's own operations.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench.concurrent_export import train_checkpoints
from bench.operate import export, running_server
from fpt_deploy.artifacts import MANIFEST, task_dir

A, B = "bit-xor", "bit-memory"


def post(conn: http.client.HTTPConnection, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def call(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a connection of its own: the control calls are minutes apart (keep-alive expires)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def body_for(meta: dict, rng) -> bytes:
    spec = meta["inputs"][0]
    shape = [1, *[int(s) for s in spec["shape"][1:]]]
    data = rng.integers(0, 2, size=shape).reshape(-1).tolist()
    return json.dumps(
        {"inputs": [{"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": data}]}
    ).encode()


class Clients:
    """Closed-loop clients on task A, each on its own keep-alive connection, recording every request."""

    def __init__(self, url: str, body: bytes, count: int) -> None:
        self.url, self.body = url, body
        self.records: list[list[tuple[float, float, int]]] = [[] for _ in range(count)]  # (start, seconds, status)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, i: int) -> None:
        host, port = self.url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        out = self.records[i]
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = post(conn, f"/v2/models/{A}/infer", self.body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            out.append((t0, time.perf_counter() - t0, status))

    def window(self, start: float, end: float) -> dict:
        rows = [r for records in self.records for r in records if start <= r[0] < end]
        ok = np.array([s for _, s, status in rows if status == 200])
        return {
            "requests": len(rows),
            "failures": sum(1 for *_, status in rows if status != 200),
            "requests_per_s": round(len(rows) / max(end - start, 1e-9), 1),
            "p50_ms": round(1000 * float(np.percentile(ok, 50)), 2) if ok.size else None,
            "p99_ms": round(1000 * float(np.percentile(ok, 99)), 2) if ok.size else None,
            "max_ms": round(1000 * float(ok.max()), 2) if ok.size else None,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="at least this long; longer if B's cycle is")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fpt-live-load-"))
    checkpoints = train_checkpoints(work / "checkpoints", (A, B))
    repo = work / "repo"
    if (repo / task_dir(B)).exists() or not (repo / MANIFEST).exists():
        import shutil

        shutil.rmtree(repo, ignore_errors=True)
        export([checkpoints[A]], repo)
    with running_server(repo) as served:
        url, server = served.address, psutil.Process(served.proc.pid)
        meta_a = json.loads(call(url, "GET", f"/v2/models/{A}")[1])
        clients = Clients(url, body_for(meta_a, np.random.default_rng(0)), args.clients)
        for t in clients.threads:
            t.start()
        time.sleep(2.0)  # warm-up, left out of every window
        t_start = time.perf_counter()
        rss_before = server.memory_info().rss
        time.sleep(args.seconds / 4)  # the "before" window
        events = {"export_start": time.perf_counter()}
        events["export_s"] = export([checkpoints[B]], repo)
        events["load_start"] = time.perf_counter()
        status, text = call(url, "POST", f"/v2/repository/models/{B}/load")
        events["load_ms"] = 1000 * (time.perf_counter() - events["load_start"])
        assert status == 200, text
        body_b = body_for(json.loads(call(url, "GET", f"/v2/models/{B}")[1]), np.random.default_rng(1))
        b_status = [call(url, "POST", f"/v2/models/{B}/infer", body_b)[0] for _ in range(20)]
        t_unload = time.perf_counter()
        status, text = call(url, "POST", f"/v2/repository/models/{B}/unload")
        events["unload_ms"] = 1000 * (time.perf_counter() - t_unload)
        assert status == 200, text
        events["unload_end"] = time.perf_counter()
        remaining = max(args.seconds - (events["unload_end"] - t_start), args.seconds / 4)
        time.sleep(remaining)  # the "after" window
        t_end = time.perf_counter()
        rss_after = server.memory_info().rss
        clients.stop.set()
        for t in clients.threads:
            t.join(35)
    result = {
        "machine": platform.processor() or platform.machine(),
        "clients": args.clients,
        "seconds": round(t_end - t_start, 1),
        "task_a": A,
        "task_b": B,
        "a_total": clients.window(t_start, t_end),
        "a_before": clients.window(t_start, events["export_start"]),
        "a_during_export": clients.window(events["export_start"], events["load_start"]),
        "a_during_load_query_unload": clients.window(events["load_start"], events["unload_end"]),
        "a_after": clients.window(events["unload_end"], t_end),
        "b_export_s": round(events["export_s"], 1),
        "b_load_ms": round(events["load_ms"], 1),
        "b_unload_ms": round(events["unload_ms"], 1),
        "b_queries_ok": sum(s == 200 for s in b_status),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
