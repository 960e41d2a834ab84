"""Operate a running server the way a Triton user does: tritonclient.http and tritonclient.grpc.

    python -m bench.operate                       # tiny-bert tasks; prints each call and its result
    python -m bench.operate --out bench/results/operate.txt

The server starts (``fpt-deploy serve --model-control-mode explicit --load-model '*' --grpc-port ...``)
with bit-xor and mnist; then bit-memory is exported into its repository while it runs. Over each protocol in turn:
get_model_repository_index, load_model(bit-memory), infer on it, get_inference_statistics,
get_model_config, infer with class_count=3, unload_model. Last, the Triton-named series of /metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.concurrent_export import train_checkpoints
from bench.server_process import ServerProcess, free_port
from fpt_deploy.artifacts import MANIFEST, task_dir

SERVED, LATE = ("bit-xor", "mnist"), "bit-memory"


def export(checkpoints: list[Path], repo: Path) -> float:
    """``fpt-deploy export`` in its own process (as a user runs it beside the server); seconds taken."""
    t0 = time.perf_counter()
    args = [sys.executable, "-m", "fpt_deploy.cli", "export", "--repo", str(repo)]
    for c in checkpoints:
        args += ["--checkpoint", str(c)]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def running_server(repo: Path, threads: int = 1, **settings) -> ServerProcess:
    """``fpt-deploy serve`` on free ports in explicit model control with gRPC, the tasks exported so far loaded
    (``--load-model *``, as Triton's explicit mode loads nothing without it); ready, its log beside ``repo``."""
    return ServerProcess.fpt_deploy(
        repo,
        log_path=Path(repo).parent / "server.log",
        ready_timeout=120.0,
        stop_timeout=60.0,
        grpc_port=free_port(),
        model_control_mode="explicit",
        load_model=["*"],
        threads=threads,
        **settings,
    )


def example_input(tc, meta: dict, rows: int, rng):
    """A valid batch for a task from its metadata (bits 0/1 for UINT8 vectors, pixels for images)."""
    spec = meta["inputs"][0]
    shape = [rows, *[int(s) for s in spec["shape"][1:]]]
    high = 2 if len(shape) == 2 else 256
    x = rng.integers(0, high, size=shape).astype(np.uint8 if spec["datatype"] == "UINT8" else np.int64)
    inp = tc.InferInput(spec["name"], shape, spec["datatype"])
    inp.set_data_from_numpy(x)
    return inp


def walkthrough(protocol: str, url: str, repo: Path, late_checkpoint: Path, say) -> None:
    if protocol == "http":
        import tritonclient.http as tc

        client, kw = tc.InferenceServerClient(url), {}
    else:
        import tritonclient.grpc as tc

        client, kw = tc.InferenceServerClient(url), {"as_json": True}
    rng = np.random.default_rng(0)
    say(f"\n== tritonclient.{protocol} at {url}")
    say(f"get_model_repository_index() -> {json.dumps(client.get_model_repository_index(**kw))}")
    if not (repo / task_dir(LATE)).exists():
        seconds = export([late_checkpoint], repo)
        say(f"(fpt-deploy export of {LATE} into the served repository: {seconds:.1f} s)")
        say(f"get_model_repository_index() -> {json.dumps(client.get_model_repository_index(**kw))}")
    t0 = time.perf_counter()
    client.load_model(LATE)
    ms = 1000 * (time.perf_counter() - t0)
    say(f"load_model({LATE!r}) -> ok in {ms:.0f} ms; ready: {client.is_model_ready(LATE)}")
    meta = client.get_model_metadata(LATE, **kw)
    result = client.infer(LATE, [example_input(tc, meta, 2, rng)], outputs=[tc.InferRequestedOutput("labels")])
    say(f"infer({LATE!r}, 2 rows) -> labels {result.as_numpy('labels').tolist()}")
    stats = client.get_inference_statistics(LATE, **kw)
    say(f"get_inference_statistics({LATE!r}) -> {json.dumps(stats)}")
    config = client.get_model_config(LATE, **kw)
    say(f"get_model_config({LATE!r}) -> {json.dumps(config)}")
    top = client.infer(
        "mnist",
        [example_input(tc, client.get_model_metadata("mnist", **kw), 1, rng)],
        outputs=[tc.InferRequestedOutput("probabilities", class_count=3)],
    )
    say(f"infer('mnist', class_count=3) -> {[s.decode() for s in top.as_numpy('probabilities').reshape(-1)]}")
    xor = client.infer("bit-xor", [example_input(tc, client.get_model_metadata("bit-xor", **kw), 4, rng)])
    say(f"infer('bit-xor', 4 rows) -> labels {xor.as_numpy('labels').tolist()}")
    client.unload_model(LATE)
    say(f"unload_model({LATE!r}) -> ok; ready: {client.is_model_ready(LATE)}")
    say(f"get_model_repository_index() -> {json.dumps(client.get_model_repository_index(**kw))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fpt-operate-"))
    checkpoints = train_checkpoints(work / "checkpoints", (*SERVED, LATE))
    repo = work / "repo"
    if not (repo / MANIFEST).exists():
        export([checkpoints[t] for t in SERVED], repo)
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with running_server(repo) as server:
        http_url, grpc_url = server.address, server.grpc_address
        walkthrough("http", http_url, repo, checkpoints[LATE], say)
        walkthrough("grpc", grpc_url, repo, checkpoints[LATE], say)
        with urllib.request.urlopen(f"http://{http_url}/metrics") as r:
            metrics = r.read().decode()
        say(f"\n== curl http://{http_url}/metrics | grep nv_inference  (Triton's series, two tasks)")
        for line in metrics.splitlines():
            if line.startswith("nv_inference") and ('model="bit-xor"' in line or 'model="mnist"' in line):
                say(line)
        say(next(line for line in metrics.splitlines() if line.startswith("process_resident_memory_bytes")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
