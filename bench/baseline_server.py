"""The baseline fpt-deploy is measured against: one complete model per task, served as a user would.

    python -m bench.baseline_server --runtime torch --model mnist=runs/mnist/best --model mnist-b=runs/mnist/best
    python -m bench.baseline_server --runtime ort --model mnist=full.onnx --model mnist-b=full.onnx

What it is, exactly (the fair version of "FastAPI + torch" that someone without fpt-deploy writes):

- Every task is its own complete model, nothing shared: ``--runtime torch`` holds a PyTorch FPT per task
  with its OWN copy of the body (``load_checkpoint`` once per checkpoint, ``copy.deepcopy`` for every
  further task); ``--runtime ort`` holds one ONNX Runtime session per task of that task's whole model
  (input head + body + output head in one graph, exported separately per task).
- The same wire format as the fpt-deploy server: ``POST /v2/models/{task}/infer`` with the KServe v2
  binary extension (what ``tritonclient.http`` sends), the argmax labels back as binary, so one load
  generator drives both. ``GET /v2/health/ready`` for start-up.
- One inference worker thread with a dynamic batcher over all tasks: it waits for the first request,
  then until ``--max-batch-size`` rows wait or the oldest has waited ``--max-queue-delay-ms`` (the same
  settings as the fpt-deploy server), then runs ONE call per task present with all of that task's
  waiting rows. Rows of different tasks cannot share a call: each task has its own model.
- Threads: torch intra-op threads / ONNX Runtime intra-op threads = physical cores, ORT spinning off,
  graph optimisation on, and each ORT graph loaded with ONNX Runtime's transformer fusions
  (``fpt_deploy.serving.runtimes.ort_rewrite``), and the same GIL switch interval: the settings the fpt-deploy server
  uses, so the comparison is architecture, not tuning.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fpt_deploy.serving.server import GIL_SWITCH_INTERVAL_S

log = logging.getLogger("bench.baseline_server")
HEADER_LENGTH = "Inference-Header-Content-Length"
_DTYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32}


def load_torch_models(models: dict[str, Path], threads: int):
    """task -> callable(raw ndarray) -> logits ndarray; each task its own FPT with its own body copy."""
    import torch

    from fpt_deploy.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    loaded: dict[Path, object] = {}
    fns = {}
    for name, path in models.items():
        if path in loaded:
            model = copy.deepcopy(loaded[path])  # its own body: what N independently loaded models hold
        else:
            model = loaded[path] = load_checkpoint(path)[0].eval()

        def run(raw: np.ndarray, model=model) -> np.ndarray:
            raw = np.require(raw, requirements="W")  # a request's bytes are read-only; torch wants writable
            with torch.inference_mode():
                return model(torch.from_numpy(raw)).numpy()

        fns[name] = run
    return fns


def load_ort_models(models: dict[str, Path], threads: int):
    """task -> callable(raw ndarray) -> logits ndarray; one full-model session per task."""
    import onnxruntime as ort
    from fpt_deploy.serving.runtimes.ort_rewrite import ort_graph
    from fpt_deploy.serving.runtimes.sessions import session_options

    fns = {}
    for name, path in models.items():
        with ort_graph(path) as graph:  # ORT's transformer fusions, as fpt-deploy's runtime loads graphs
            session = ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(raw: np.ndarray, session=session, input_name=input_name) -> np.ndarray:
            return session.run(None, {input_name: raw})[0]

        fns[name] = run
    return fns


class PerTaskBatcher:
    """One worker thread; a batch of waiting requests runs as one call per task present in it."""

    def __init__(self, models: dict, max_batch_size: int, max_queue_delay_ms: float) -> None:
        self.models, self.max_batch_size = models, max_batch_size
        self.delay = max_queue_delay_ms / 1000
        self._queue: deque = deque()  # (task, raw (n, ...), future, enqueued)
        self._rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self.calls = self.batches = 0
        self._worker = threading.Thread(target=self._loop, name="baseline-batcher", daemon=True)
        self._worker.start()

    def submit(self, task: str, raw: np.ndarray) -> Future:
        future: Future = Future()
        with self._cond:
            self._queue.append((task, raw, future, time.perf_counter()))
            self._rows += len(raw)
            self._cond.notify()
        return future

    def _take(self) -> list | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0][3] + self.delay
            while self._rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._queue and (not batch or rows + len(self._queue[0][1]) <= self.max_batch_size):
                item = self._queue.popleft()
                self._rows -= len(item[1])
                rows += len(item[1])
                batch.append(item)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batches += 1
            by_task: dict[str, list] = {}
            for item in batch:
                by_task.setdefault(item[0], []).append(item)
            for task, items in by_task.items():
                try:
                    raw = items[0][1] if len(items) == 1 else np.concatenate([it[1] for it in items])
                    logits = self.models[task](raw)
                    self.calls += 1
                except Exception as e:  # noqa: BLE001  (delivered to the requests; the worker survives)
                    for it in items:
                        it[2].set_exception(e)
                    continue
                offset = 0
                for it in items:
                    n = len(it[1])
                    it[2].set_result(logits[offset : offset + n])
                    offset += n

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(30)


def decode_binary(body: bytes, header_length: str | None) -> np.ndarray:
    """The one input of a KServe v2 binary request, as a view of the body (no copy)."""
    n = int(header_length or len(body))
    spec = json.loads(body[:n])["inputs"][0]
    dtype = np.dtype(_DTYPES[spec["datatype"]])
    return np.frombuffer(body, dtype=dtype, offset=n, count=int(np.prod(spec["shape"]))).reshape(spec["shape"])


def create_app(models: dict, max_batch_size: int, max_queue_delay_ms: float):
    batcher = PerTaskBatcher(models, max_batch_size, max_queue_delay_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200)

    @app.get("/stats")
    async def stats():
        return {"batches": batcher.batches, "calls": batcher.calls}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        if name not in models:
            return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
        try:
            raw = decode_binary(await request.body(), request.headers.get(HEADER_LENGTH))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        logits = await asyncio.wrap_future(batcher.submit(name, raw))
        labels = np.ascontiguousarray(logits.argmax(axis=-1).astype(np.int64))
        header = json.dumps(
            {
                "model_name": name,
                "outputs": [
                    {
                        "name": "labels",
                        "datatype": "INT64",
                        "shape": list(labels.shape),
                        "parameters": {"binary_data_size": labels.nbytes},
                    }
                ],
            }
        ).encode()
        return Response(
            header + labels.tobytes(),
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(header))},
        )

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=("torch", "ort"), required=True)
    p.add_argument("--model", action="append", required=True, help="NAME=PATH (checkpoint for torch, .onnx for ort)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import psutil
    import uvicorn

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        models[name] = Path(path)
    loader = load_torch_models if args.runtime == "torch" else load_ort_models
    fns = loader(models, threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the fpt-deploy server's setting (measured: no change here)
    app = create_app(fns, args.max_batch_size, args.max_queue_delay_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
