"""What the server counts: Triton's per-model statistics, its Prometheus series, and the fpt-specific ones.

One store, ``ServingMetrics``, is fed by the batcher (queue time, batches), the executor (stage times,
backbone calls) and the protocol front ends (request outcome and duration). Everything else reads it:

- ``GET /v2/models/stats`` and gRPC ``ModelStatistics`` (Triton's statistics extension):
  ``statistics()`` returns Triton's JSON shape per task, plus one entry for the shared backbone whose
  ``execution_count`` counts backbone calls and ``inference_count`` the rows they carried, so batching
  and task mixing are visible next to each task's own counts;
- ``GET /metrics``: Triton's series (``nv_inference_request_success``, ``nv_inference_count``,
  ``nv_inference_queue_duration_us``, ... labelled ``model`` and ``version``), the fpt series (tasks per
  backbone call, padding, mixed batches), and the standard process, platform and GC collectors.

Durations follow Triton's rule: every request of a batch is charged the batch's compute time, so
``compute_infer.ns / compute_infer.count`` is the mean backbone time a request waited on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from fpt_deploy.serving.protocol import MODEL_VERSION
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TASKS = (1, 2, 3, 4, 8, 16, 32, 64)
LATENCY_WINDOW = 1024  # recent request durations per task kept for the p50/p99 summary
QUANTILES = (0.5, 0.9, 0.95, 0.99)  # Triton's nv_inference_request_summary_us quantiles
# Executor stage -> Triton's duration of that stage.
STAGES = {"input_head": "compute_input", "backbone": "compute_infer", "output_head": "compute_output"}
UNKNOWN_MODEL = "<unknown>"  # label of requests for a model that is not served (a bounded label set)


@dataclass
class Duration:
    """Triton's StatisticDuration: how many times, and how many nanoseconds in all."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += int(seconds * 1e9) * times

    def to_json(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    """Triton's ModelStatistics of one model (a task, or the shared backbone)."""

    name: str
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # executions (batches) that held this model's rows
    last_inference: int = 0  # ms since the epoch
    success: Duration = field(default_factory=Duration)  # request duration of the successful ones
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    latencies_us: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # rows of this model in one execution -> its stage durations (Triton's batch_stats, one count a batch)
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)

    def batch(self, rows: int) -> dict[str, Duration]:
        if rows not in self.batches:
            self.batches[rows] = {kind: Duration() for kind in STAGES.values()}
        return self.batches[rows]

    DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def to_json(self) -> dict:
        """The JSON Triton's ``GET /v2/models/<name>/stats`` returns for one model version."""
        return {
            "name": self.name,
            "version": MODEL_VERSION,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: getattr(self, k).to_json() for k in self.DURATIONS},
            "batch_stats": [
                {"batch_size": rows, **{k: d.to_json() for k, d in stages.items()}}
                for rows, stages in sorted(self.batches.items())
            ],
        }

    def quantiles_us(self) -> dict[float, float]:
        if not self.latencies_us:
            return {}
        values = np.quantile(np.fromiter(self.latencies_us, float), QUANTILES)
        return dict(zip(QUANTILES, values.tolist(), strict=True))


class ServingMetrics:
    """Per-task statistics (Triton's), request counts, queue and compute time, batch sizes, task mixing."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_collectors: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self.started = time.time()
        self._lock = threading.Lock()
        self._models: dict[str, ModelStatistics] = {}
        self.backbone = ModelStatistics("backbone")  # renamed by ``name_backbone``
        self._current: dict[str, tuple[int, int]] = {}  # task -> (requests, rows) of the executing batch
        r = self.registry
        if process_collectors:  # process_resident_memory_bytes, CPU seconds, open fds; python_info; GC
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        r.register(_TritonCollector(self))
        self.requests = Counter(
            "fpt_inference_requests", "Inference requests by task and outcome", ["task", "status"], registry=r
        )
        self.failures = Counter(
            "fpt_inference_failures", "Failed inference requests by task and HTTP status", ["task", "code"], registry=r
        )
        self.rows = Counter("fpt_inference_rows", "Rows (examples) inferred, by task", ["task"], registry=r)
        self.queue_seconds = Histogram(
            "fpt_queue_seconds", "Time a request waited in the batcher's queue", buckets=_LATENCY, registry=r
        )
        self.request_seconds = Histogram(
            "fpt_request_seconds", "Time from decoded request to encoded response", buckets=_LATENCY, registry=r
        )
        self.compute_seconds = Histogram(
            "fpt_compute_seconds", "Compute time of one batch by stage", ["stage"], buckets=_LATENCY, registry=r
        )
        self.batch_rows = Histogram("fpt_batch_rows", "Rows in each executed batch", buckets=_ROWS, registry=r)
        self.batch_tasks = Histogram(
            "fpt_batch_tasks", "Distinct tasks in each executed batch", buckets=_TASKS, registry=r
        )
        self.mixed_batches = Counter("fpt_mixed_task_batches", "Executed batches holding rows of 2+ tasks", registry=r)
        self.backbone_calls = Counter("fpt_backbone_calls", "Backbone executions", registry=r)
        self.backbone_rows = Histogram(
            "fpt_backbone_call_rows", "Rows in each backbone call", buckets=_ROWS, registry=r
        )
        self.backbone_tasks = Histogram(
            "fpt_backbone_call_tasks", "Distinct tasks in each backbone call", buckets=_TASKS, registry=r
        )
        self.mixed_backbone_calls = Counter(
            "fpt_mixed_task_backbone_calls", "Backbone calls whose rows belong to 2+ tasks", registry=r
        )
        self.padded_tokens = Counter("fpt_backbone_padded_tokens", "Padding tokens the backbone computed", registry=r)
        self.real_tokens = Counter("fpt_backbone_real_tokens", "Real tokens the backbone computed", registry=r)
        self.queue_depth = Gauge("fpt_queue_depth", "Requests waiting in the batcher's queue", registry=r)
        self.page_ins = Counter(
            "fpt_task_page_ins",
            "Tasks whose rows were read back from the repository (--max-resident-tasks)",
            registry=r,
        )
        self.resident_tasks = Gauge("fpt_resident_tasks", "Tasks whose rows are in memory", registry=r)

    # -- what the statistics endpoints read ---------------------------------------------------------

    def name_backbone(self, name: str) -> None:
        """The name the backbone's statistics go by (``backbone-<fingerprint>``: never a task's name)."""
        self.backbone.name = name

    def model(self, name: str) -> ModelStatistics:
        """The statistics of task ``name`` (zeros for a task that has served nothing yet)."""
        with self._lock:
            return self._models.get(name) or ModelStatistics(name)

    def statistics(self, tasks: list[str]) -> list[dict]:
        """Triton's ``model_stats`` list for ``tasks``, then the shared backbone's entry."""
        with self._lock:
            entries = [(self._models.get(t) or ModelStatistics(t)).to_json() for t in tasks]
            return [*entries, self.backbone.to_json()]

    def forget(self, task: str) -> None:
        """Drop an unloaded task's statistics and series (Triton reports loaded models only)."""
        with self._lock:
            self._models.pop(task, None)

    def _stats(self, task: str) -> ModelStatistics:  # call with self._lock held
        stats = self._models.get(task)
        if stats is None:
            stats = self._models[task] = ModelStatistics(task)
        return stats

    # -- what the batcher, the executor and the front ends report -----------------------------------

    def observe_batch(self, batch, now: float | None = None) -> None:
        """A batch the worker is about to execute: queue time of each request, counts per task."""
        now = time.perf_counter() if now is None else now
        per_task: dict[str, int] = {}
        requests: dict[str, int] = {}
        with self._lock:
            for request in batch:
                name = request.task.name
                per_task[name] = per_task.get(name, 0) + request.rows
                requests[name] = requests.get(name, 0) + 1
                self._stats(name).queue.add(now - request.enqueued)
            ms = int(time.time() * 1000)
            for name, rows in per_task.items():
                stats = self._stats(name)
                stats.inference_count += rows
                stats.execution_count += 1
                stats.last_inference = ms
            self._current = {name: (requests[name], rows) for name, rows in per_task.items()}
        for request in batch:
            self.queue_seconds.observe(now - request.enqueued)
        for name, rows in per_task.items():
            self.rows.labels(name).inc(rows)
        self.batch_rows.observe(sum(per_task.values()))
        self.batch_tasks.observe(len(per_task))
        if len(per_task) > 1:
            self.mixed_batches.inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One stage of the current batch: each of its requests is charged the stage's time."""
        self.compute_seconds.labels(stage).observe(seconds)
        kind = STAGES.get(stage)
        if kind is None:
            return
        with self._lock:
            for name, (requests, rows) in self._current.items():
                stats = self._stats(name)
                getattr(stats, kind).add(seconds, requests)
                stats.batch(rows)[kind].add(seconds)

    def observe_backbone_call(self, rows: int, tasks: int, tokens: int, real_tokens: int) -> None:
        with self._lock:
            self.backbone.execution_count += 1
            self.backbone.inference_count += rows
            self.backbone.last_inference = int(time.time() * 1000)
        self.backbone_calls.inc()
        self.backbone_rows.observe(rows)
        self.backbone_tasks.observe(tasks)
        if tasks > 1:
            self.mixed_backbone_calls.inc()
        self.real_tokens.inc(real_tokens)
        self.padded_tokens.inc(tokens - real_tokens)

    def observe_request(self, task: str, code: int, seconds: float | None = None) -> None:
        """A request answered with HTTP status ``code`` (gRPC maps its status to the same codes)."""
        self.requests.labels(task, "success" if code == 200 else "failure").inc()
        if code != 200:
            self.failures.labels(task, str(code)).inc()
        if seconds is not None:
            self.request_seconds.observe(seconds)
        if task == UNKNOWN_MODEL:
            return
        with self._lock:
            stats = self._stats(task)
            if code == 200:
                stats.success.add(seconds or 0.0)
                if seconds is not None:
                    stats.latencies_us.append(seconds * 1e6)
            else:
                stats.fail.add(seconds or 0.0)


def _metric(name: str, doc: str, kind: str) -> Metric:
    # Built directly so that counters keep Triton's names: CounterMetricFamily would append ``_total``.
    return Metric(name, doc, kind)


class _TritonCollector:
    """Triton's Prometheus series, read from the statistics at scrape time (one source for both)."""

    COUNTERS = (
        ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success"),
        ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "fail"),
        ("nv_inference_count", "Number of inferences performed (does not include cached requests)", None),
        ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)", None),
        ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds", "request"),
        ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "queue"),
        (
            "nv_inference_compute_input_duration_us",
            "Cumulative compute input duration in microseconds",
            "compute_input",
        ),
        (
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute inference duration in microseconds",
            "compute_infer",
        ),
        (
            "nv_inference_compute_output_duration_us",
            "Cumulative inference compute output duration in microseconds",
            "compute_output",
        ),
    )

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def _value(self, stats: ModelStatistics, name: str, source: str | None) -> float:
        if name == "nv_inference_count":
            return stats.inference_count
        if name == "nv_inference_exec_count":
            return stats.execution_count
        if source in ("success", "fail"):
            return getattr(stats, source).count
        if source == "request":
            return (stats.success.ns + stats.fail.ns) / 1000
        return getattr(stats, source).ns / 1000

    def collect(self):
        m = self.metrics
        with m._lock:  # read every value at one instant, then build the series outside the lock
            models = [*m._models.values(), m.backbone]
            values = [
                (s.name, [self._value(s, name, source) for name, _, source in self.COUNTERS], list(s.latencies_us))
                for s in models
            ]
        for i, (name, doc, _) in enumerate(self.COUNTERS):
            metric = _metric(name, doc, "counter")
            for model, counts, _ in values:
                metric.add_sample(name, {"model": model, "version": MODEL_VERSION}, counts[i])
            yield metric
        summary = _metric(
            "nv_inference_request_summary_us", "Summary of inference request duration in microseconds", "summary"
        )
        for model, _, latencies in values[:-1]:  # tasks only: the backbone answers no requests itself
            labels = {"model": model, "version": MODEL_VERSION}
            if latencies:
                for q, v in zip(QUANTILES, np.quantile(latencies, QUANTILES).tolist(), strict=True):
                    summary.add_sample("nv_inference_request_summary_us", {**labels, "quantile": str(q)}, v)
            summary.add_sample("nv_inference_request_summary_us_count", labels, len(latencies))
            summary.add_sample("nv_inference_request_summary_us_sum", labels, float(sum(latencies)))
        yield summary


def configure_server_logs(access_log: bool = False) -> None:
    """Serve logs carry time and level; uvicorn's access log (one line a request) only when asked for."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(fmt)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if access_log else logging.WARNING)
