"""``make demo``: the whole user story on the embedded defaults, offline, on the CPU.

1. train MNIST on the embedded 5,000-image sample with the frozen MiniLM body;
2. export it (backbone ONNX once, the task's small heads), validated against PyTorch;
3. start ``fpt-deploy serve`` and send every held-out image through it with ``tritonclient.http``
   (one image a request, 16 concurrent clients, the binary tensor extension);
4. print the served accuracy and throughput, then stop the server.

Each step runs the real CLI in a subprocess, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "fpt_deploy.cli"]
# The task's own recipe (fpt_deploy/tasks/images.py: cosine, lr 3e-3, 6 epochs); README has the figures.
TRAIN_ARGS = ["--task", "mnist"]


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _run(args: list[str]) -> None:
    print("$ fpt-deploy " + shlex.join(args), flush=True)
    subprocess.run(CLI + args, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f}s")


def _query(url: str, images: np.ndarray, concurrency: int) -> tuple[np.ndarray, list[float], float]:
    """Send each image as its own request; returns (predicted labels, latencies, seconds)."""
    import tritonclient.http as httpclient

    def infer(chunk: np.ndarray) -> list[tuple[int, float]]:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        out = []
        for image in chunk:
            tensor = httpclient.InferInput("input", [1, 28, 28], "UINT8")
            tensor.set_data_from_numpy(image[None], binary_data=True)
            start = time.perf_counter()
            result = client.infer("mnist", [tensor], outputs=[httpclient.InferRequestedOutput("logits")])
            out.append((int(result.as_numpy("logits")[0].argmax()), time.perf_counter() - start))
        client.close()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for part in pool.map(infer, np.array_split(images, concurrency)) for r in part]
    seconds = time.perf_counter() - start
    return np.array([p for p, _ in results]), [lat for _, lat in results], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where training writes (runs/mnist)")
    parser.add_argument("--repo", type=Path, default=Path("deploy"), help="deployment repository to write")
    parser.add_argument("--retrain", action="store_true", help="train again even if runs/mnist/best exists")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    run_dir = args.runs / "mnist"
    t0 = time.perf_counter()

    _step("1/4 train MNIST (embedded sample, frozen MiniLM; only input layer, positions, norms, output train)")
    if (run_dir / "best" / "config.json").is_file() and not args.retrain:
        print(f"using the existing checkpoint {run_dir / 'best'} (pass --retrain, or delete it, to train again)")
    else:
        _run(["train", *TRAIN_ARGS, "--out", str(run_dir)])
    _run(["evaluate", "--checkpoint", str(run_dir)])

    _step("2/4 export: the backbone ONNX once, the task's heads and norms, checked against PyTorch")
    _run(["export", "--task", "mnist", "--checkpoint", str(run_dir / "best"), "--repo", str(args.repo)])

    _step("3/4 serve the repository and send every held-out image through it")
    from fpt_deploy.tasks import get_task

    held_out = get_task("mnist").load_data("test")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["serve", "--repo", str(args.repo), "--port", str(port)]
    print("$ fpt-deploy " + shlex.join(cmd), flush=True)
    server = subprocess.Popen(CLI + cmd)
    try:
        _wait_ready(url, server)
        predicted, latencies, seconds = _query(url, held_out.inputs, args.concurrency)
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=60)

    _step("4/4 results")
    accuracy = float((predicted == held_out.labels).mean())
    lat = np.array(latencies) * 1000
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("fpt_batch_rows_"))
    print(f"served {len(predicted)} held-out images: accuracy {accuracy:.4f}")
    print(
        f"throughput {len(predicted) / seconds:.0f} requests/s at concurrency {args.concurrency}; "
        f"latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms"
    )
    if "fpt_batch_rows_count" in samples:
        count, rows = float(samples["fpt_batch_rows_count"]), float(samples["fpt_batch_rows_sum"])
        print(f"the dynamic batcher ran {count:.0f} batches, {rows / max(count, 1):.1f} requests a batch on average")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; server stopped")
    if accuracy < 0.90:
        raise SystemExit(f"served accuracy {accuracy:.4f} is below the 0.90 the demo promises")


if __name__ == "__main__":
    main()
