"""A dynamic batcher for every task on one backbone, separate from what executes a batch.

Requests of ANY task join one bounded queue. A worker thread hands batches to ``execute`` (a
``MixedBatchExecutor``) off the event loop. When to take a batch:

- the server is idle (no batch ran within the last ``max_queue_delay_ms``): at once, so a lone
  request never waits for company that is not coming (Triton runs an idle instance's request at once);
- while there is work to join (a batch just ran): until as many rows are queued as the last batch
  had (its clients are coming back), ``max_batch_size`` rows, or the oldest request has waited
  ``max_queue_delay_ms``, whichever comes first.

Each request is counted in and out of its task (``LoadedTask.begin_request``), which is how
``ServingModel.remove_task`` knows when a task's queued and running work has drained. A full
queue refuses new requests at once (``QueueFullError``, HTTP 503) instead of letting latency grow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from fpt_deploy.serving.config import RuntimeConfig
from fpt_deploy.serving.errors import InvalidInputError, QueueFullError, ServerClosingError
from fpt_deploy.serving.executor import InferenceRequest
from fpt_deploy.serving.model import LoadedTask

log = logging.getLogger(__name__)


class DynamicBatcher:
    """Collects requests from any thread; one worker thread executes them in batches."""

    def __init__(
        self,
        execute: Callable[[list[InferenceRequest]], None],
        max_batch_size: int = RuntimeConfig.max_batch_size,  # each default is the config's
        max_queue_delay_ms: float = RuntimeConfig.max_queue_delay_ms,
        max_queue_size: int = RuntimeConfig.max_queue_size,
        metrics=None,
        max_queue_rows: int | None = None,
    ) -> None:
        self.execute = execute
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.max_queue_rows = max_queue_rows  # None: bounded by max_queue_size only
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.metrics = metrics
        self._queue: deque[InferenceRequest] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch_rows = 0  # rows of the batch that ran last
        self._last_batch_end = float("-inf")  # when it finished (perf_counter)
        self._worker = threading.Thread(target=self._loop, name="fpt-batcher", daemon=True)
        self._worker.start()

    def submit(self, task: LoadedTask, inputs: np.ndarray) -> Future:
        """Queue ``inputs`` (n, *input_shape) of ``task``; the future resolves to an ``InferenceResult``."""
        if not 1 <= inputs.shape[0] <= self.max_batch_size:
            raise InvalidInputError(
                f"a request must have between 1 and {self.max_batch_size} rows (max batch size), got {inputs.shape[0]}"
            )
        request = InferenceRequest(task, inputs)
        with self._cond:
            if self._closed:
                raise ServerClosingError("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFullError(f"the queue is full ({self.max_queue_size} requests waiting); retry later")
            if self.max_queue_rows is not None and self._queued_rows + request.rows > self.max_queue_rows:
                raise QueueFullError(
                    f"the queue is full ({self._queued_rows} rows waiting, limit {self.max_queue_rows}); retry later"
                )
            task.begin_request()  # refused while the task is being unloaded
            request.future.add_done_callback(task.end_request)
            self._queue.append(request)
            self._queued_rows += request.rows
            if self.metrics is not None:
                self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return request.future

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_full(self) -> bool:
        """Whether a new request would be refused now (the server checks before reading its body)."""
        rows_full = self.max_queue_rows is not None and self._queued_rows >= self.max_queue_rows
        return rows_full or len(self._queue) >= self.max_queue_size

    def _take_batch(self) -> list[InferenceRequest] | None:
        """Block until a batch is due; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + self.max_queue_delay
            busy = time.perf_counter() - self._last_batch_end < self.max_queue_delay  # work to join
            wanted = min(self.max_batch_size, self._last_batch_rows) if busy else 1
            while self._queued_rows < wanted and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
                request = self._queue.popleft()
                self._queued_rows -= request.rows
                rows += request.rows
                batch.append(request)
            if self.metrics is not None:
                self.metrics.queue_depth.set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # Requests whose caller gave up (a closed connection) are dropped, never executed.
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            if self.metrics is not None:
                self.metrics.observe_batch(batch, time.perf_counter())
            try:
                self.execute(batch)
            except Exception as e:  # noqa: BLE001  (the worker must survive anything)
                log.exception("batch execution failed")
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            with self._cond:
                self._last_batch_rows = sum(r.rows for r in batch)
                self._last_batch_end = time.perf_counter()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish every queued one, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("the batcher did not drain within %.0fs", timeout)
