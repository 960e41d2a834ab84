"""Offline batch inference (``fpt-deploy predict``) through the same runtime, batcher and executor as the server."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fpt_deploy.serving.config import PredictConfig
from fpt_deploy.serving.service import build_pipeline

from fpt_deploy.atomic import write_text, write_with
from fpt_deploy.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    task: str
    rows: int
    labels: np.ndarray  # (N,) or (N, outputs) int64
    probabilities: np.ndarray  # (N, *logits_shape) float32
    logits: np.ndarray
    label_names: list[str]
    seconds: float
    output: Path | None

    def summary(self) -> str:
        counts = np.bincount(self.labels.reshape(-1), minlength=len(self.label_names))
        top = ", ".join(f"{self.label_names[i]}: {counts[i]}" for i in np.argsort(-counts)[:10] if counts[i])
        rate = self.rows / self.seconds if self.seconds else float("inf")
        where = f"; wrote {self.output}" if self.output else ""
        return (
            f"{self.task}: {self.rows} rows in {self.seconds:.2f}s ({rate:.0f} rows/s); "
            f"mean top probability {self.probabilities.max(axis=-1).mean():.3f}; predicted {top}{where}"
        )


def _load_inputs(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable .npy array ({e})") from e


def _write(path: Path, result: PredictResult) -> None:
    if path.suffix == ".json":
        doc = {
            "task": result.task,
            "label_names": result.label_names,
            "labels": result.labels.tolist(),
            "probabilities": result.probabilities.tolist(),
        }
        write_text(path, json.dumps(doc) + "\n")
        return

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, labels=result.labels, probabilities=result.probabilities, logits=result.logits)

    write_with(path, save)


def predict(config: PredictConfig) -> PredictResult:
    """Labels and probabilities of every row of ``config.input`` for ``config.task``."""
    inputs = _load_inputs(config.input)
    pipeline = build_pipeline(config, [config.task])
    task, batcher = pipeline.model.task(config.task), pipeline.batcher
    try:
        if inputs.ndim == len(task.example_shape):  # one example without a batch dim
            inputs = inputs[None]
        if inputs.dtype != task.input_dtype and inputs.dtype.kind in "iub" and task.input_dtype.kind in "iu":
            cast = inputs.astype(task.input_dtype)
            if not np.array_equal(cast, inputs):
                raise ConfigError(f"{config.input} holds values that do not fit {task.input_dtype.name}")
            inputs = cast
        if len(inputs) == 0:
            raise ConfigError(f"{config.input} holds no rows")
        step = config.max_batch_size
        t0 = time.perf_counter()
        pending, results = deque(), []
        for start in range(0, len(inputs), step):
            chunk = task.check_input(task.input_name, np.ascontiguousarray(inputs[start : start + step]), step)
            while len(pending) >= config.max_queue_size:  # keep the queue bounded: wait for the oldest
                results.append(pending.popleft().result())
            pending.append(batcher.submit(task, chunk))
        results += [f.result() for f in pending]
        seconds = time.perf_counter() - t0
    finally:
        pipeline.close()
    result = PredictResult(
        task=task.name,
        rows=len(inputs),
        labels=np.concatenate([r.labels for r in results]),
        probabilities=np.concatenate([r.probabilities for r in results]),
        logits=np.concatenate([r.logits for r in results]),
        label_names=task.labels,
        seconds=seconds,
        output=config.output,
    )
    if config.output is not None:
        _write(config.output, result)
    log.info("%s", result.summary())
    return result
