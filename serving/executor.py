"""Runs one mixed-task batch: input heads per head shape, one backbone call, output heads per shape.

    requests ──► (with --max-resident-tasks: rows of evicted tasks read back, serving/model.py)
             ──► group by head shape ──► ONE input-head call a shape (every task of it; each row
                                          gathers its task's weights by slot)
             ──► rows grouped by length, padded with the attention mask ──► ONE backbone call a group
             ──► rows back to their shape's output head (one call a shape) ──► sliced back to requests

Rows of the same length (every MNIST-shaped task, say) always share one backbone call. Rows of
different lengths are padded into one call while the padding stays within ``pad_tolerance`` of the
real tokens; beyond that they get a call of their own length, since on a CPU a padded token costs as
much as a real one. Real tokens are a prefix of each row (the exported heads' contract), so trailing
padding and trimming change no real token's output.

A request that makes its batch fail is isolated: the batch is re-run one request at a time, so only
the failing request gets the error (docs/architecture.md, "Serving").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from fpt_deploy.serving.config import RuntimeConfig
from fpt_deploy.serving.model import LoadedTask
from fpt_deploy.serving.runtimes import Runtime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class InferenceRequest:
    """Raw inputs of one task, (n, *input_shape), and the future its result is delivered to."""

    task: LoadedTask
    inputs: np.ndarray
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class InferenceResult:
    logits: np.ndarray  # (n, *logits_shape) float32
    probabilities: np.ndarray  # softmax of logits over classes
    labels: np.ndarray  # (n,) or (n, outputs) int64: argmax class


@dataclass
class _Segment:
    """All rows of one head shape in a batch (any number of its tasks)."""

    heads: object  # serving.heads.SharedHeads | OwnHeads
    requests: list[InferenceRequest]
    slots: np.ndarray  # (n,) int64: each row's slot in the shape's head tables
    task_index: np.ndarray  # (n,) int64: each row's task in the backbone's norm tables
    hidden: np.ndarray  # (n, L, D)
    mask: np.ndarray  # (n, L) int64
    start: int  # first row in the batch's row order


def real_lengths(mask: np.ndarray) -> np.ndarray:
    """(n,) one past each row's last real token (at least 1): every later position is padding."""
    L = mask.shape[1]
    last = L - np.argmax(mask[:, ::-1] != 0, axis=1)  # (n,)
    return np.where(mask.any(axis=1), last, 1)


def plan_length_groups(lengths: np.ndarray, tolerance: float) -> list[tuple[np.ndarray, int]]:
    """Split rows into (row indices, padded length) groups, one backbone call each.

    Rows are sorted by length; a longer length joins the current group while the group's padded tokens
    stay within ``(1 + tolerance)`` times its real tokens.
    """
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    groups: list[tuple[int, int, int]] = []  # (first, end) in ``order``, padded length
    real = 0
    for value, s, e in zip(values.tolist(), starts.tolist(), ends.tolist(), strict=True):
        tokens = value * (e - s)
        if groups:
            first = groups[-1][0]
            if (e - first) * value <= (1 + tolerance) * (real + tokens):
                groups[-1] = (first, e, value)
                real += tokens
                continue
        groups.append((s, e, value))
        real = tokens
    return [(order[s:e], length) for s, e, length in groups]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class MixedBatchExecutor:
    """Executes batches of ``InferenceRequest`` (any mix of tasks) on one backbone runtime."""

    def __init__(
        self,
        runtime: Runtime,
        pad_tolerance: float = RuntimeConfig.pad_tolerance,  # the config's default
        metrics=None,
        page_in: Callable[[list[LoadedTask]], int] | None = None,
    ) -> None:
        self.runtime, self.pad_tolerance, self.metrics = runtime, pad_tolerance, metrics
        self.page_in = page_in  # ServingModel.page_in: the batch's tasks' rows into memory first

    def __call__(self, batch: list[InferenceRequest]) -> None:
        """Deliver a result or an error to every request's future."""
        try:
            results = self.run(batch)
        except Exception as e:  # noqa: BLE001  (any failure is delivered to its request, never raised)
            if len(batch) == 1:
                self._fail(batch[0], e)
                return
            log.warning("a batch of %d requests failed (%s); re-running them one at a time", len(batch), e)
            for request in batch:
                self([request])
            return
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    def _fail(self, request: InferenceRequest, error: Exception) -> None:
        log.warning("request for %s failed: %s", request.task.name, error)
        if not request.future.done():
            request.future.set_exception(error)

    def _timed(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_stage(stage, t1 - t0)
        return t1

    def run(self, batch: list[InferenceRequest]) -> list[InferenceResult]:
        """Results in the order of ``batch``; raises on any failure (``__call__`` isolates it)."""
        t0 = time.perf_counter()
        if self.page_in is not None and (paged := self.page_in([r.task for r in batch])):
            if self.metrics is not None:
                self.metrics.page_ins.inc(paged)
            t0 = self._timed("page_in", t0)
        cold = sorted({r.task.name for r in batch if not r.task.resident})
        if cold:  # slot -1 would gather another task's rows: refuse rather than answer wrongly
            raise RuntimeError(
                f"rows of {', '.join(cold)} are not in memory; a server with --max-resident-tasks needs "
                "MixedBatchExecutor(..., page_in=model.page_in)"
            )
        by_shape: dict[int, list[InferenceRequest]] = {}
        for request in batch:
            by_shape.setdefault(id(request.task.heads), []).append(request)
        segments, start = [], 0
        for requests in by_shape.values():
            heads = requests[0].task.heads
            raw = requests[0].inputs if len(requests) == 1 else np.concatenate([r.inputs for r in requests])
            slots = np.concatenate([np.full(r.rows, r.task.slot, np.int64) for r in requests])  # (n,)
            task_index = np.concatenate([np.full(r.rows, r.task.index, np.int64) for r in requests])  # (n,)
            hidden, mask = heads.run_input(raw, slots)  # (n, L, D), (n, L)
            segments.append(_Segment(heads, requests, slots, task_index, hidden, mask, start))
            start += hidden.shape[0]
        t0 = self._timed("input_head", t0)
        last = self._run_backbone(segments)
        t0 = self._timed("backbone", t0)
        results: dict[int, InferenceResult] = {}
        for seg, last_hidden in zip(segments, last, strict=True):
            logits = seg.heads.run_output(last_hidden, seg.mask, seg.slots)  # (n, *logits_shape)
            probabilities = softmax(logits.astype(np.float32, copy=True))
            labels = logits.argmax(axis=-1).astype(np.int64)
            offset = 0
            for request in seg.requests:
                rows = slice(offset, offset + request.rows)
                results[id(request)] = InferenceResult(logits[rows], probabilities[rows], labels[rows])
                offset += request.rows
        self._timed("output_head", t0)
        return [results[id(r)] for r in batch]

    def _run_backbone(self, segments: list[_Segment]) -> list[np.ndarray]:
        """Each segment's last_hidden, (n, L_task, D), from as few backbone calls as the padding allows."""
        lengths = np.concatenate([real_lengths(s.mask) for s in segments])  # (rows,)
        task_index = segments[0].task_index if len(segments) == 1 else np.concatenate([s.task_index for s in segments])
        full = {s.hidden.shape[1] for s in segments}
        if len(full) == 1 and (lengths == next(iter(full))).all():
            # The common case: every row has the same length. One call, no padding, no reordering.
            hidden = segments[0].hidden if len(segments) == 1 else np.concatenate([s.hidden for s in segments])
            mask = segments[0].mask if len(segments) == 1 else np.concatenate([s.mask for s in segments])
            out = self._call(hidden, mask, task_index, int(lengths.sum()))
            return [out[s.start : s.start + s.hidden.shape[0]] for s in segments]
        seg_of_row = np.concatenate([np.full(s.hidden.shape[0], i) for i, s in enumerate(segments)])
        outs = [np.zeros_like(s.hidden) for s in segments]
        D = segments[0].hidden.shape[2]
        for rows, length in plan_length_groups(lengths, self.pad_tolerance):
            hidden = np.zeros((len(rows), length, D), np.float32)  # (b, length, D): padding is masked out
            mask = np.zeros((len(rows), length), np.int64)
            placed = []
            for i in np.unique(seg_of_row[rows]).tolist():
                s = segments[i]
                dst = np.flatnonzero(seg_of_row[rows] == i)  # positions in this call
                src = rows[dst] - s.start  # rows of the segment
                k = min(length, s.hidden.shape[1])
                hidden[dst, :k] = s.hidden[src, :k]
                mask[dst, :k] = s.mask[src, :k]
                placed.append((i, dst, src, k))
            out = self._call(hidden, mask, task_index[rows], int(lengths[rows].sum()))
            for i, dst, src, k in placed:
                outs[i][src, :k] = out[dst, :k]
        return outs

    def _call(self, hidden, mask, task_index, real_tokens: int) -> np.ndarray:
        out = self.runtime.run_backbone(hidden, mask, task_index)
        if self.metrics is not None:
            tasks = len(np.unique(task_index))
            self.metrics.observe_backbone_call(hidden.shape[0], tasks, hidden.shape[0] * hidden.shape[1], real_tokens)
        return out
