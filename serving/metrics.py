"""Prometheus metrics of the serving path (``GET /metrics``), on a registry of their own per server."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TASKS = (1, 2, 3, 4, 8, 16, 32, 64)


class ServingMetrics:
    """Request counts and failures per task, queue and compute time, batch sizes, and task mixing."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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

    def observe_batch(self, batch, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        per_task: dict[str, int] = {}
        for request in batch:
            per_task[request.task.name] = per_task.get(request.task.name, 0) + request.rows
            self.queue_seconds.observe(now - request.enqueued)
        for task, rows in per_task.items():
            self.rows.labels(task).inc(rows)
        self.batch_rows.observe(sum(per_task.values()))
        self.batch_tasks.observe(len(per_task))
        if len(per_task) > 1:
            self.mixed_batches.inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.compute_seconds.labels(stage).observe(seconds)

    def observe_backbone_call(self, rows: int, tasks: int, tokens: int, real_tokens: int) -> None:
        self.backbone_calls.inc()
        self.backbone_rows.observe(rows)
        self.backbone_tasks.observe(tasks)
        if tasks > 1:
            self.mixed_backbone_calls.inc()
        self.real_tokens.inc(real_tokens)
        self.padded_tokens.inc(tokens - real_tokens)

    def observe_request(self, task: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(task, "success" if code == 200 else "failure").inc()
        if code != 200:
            self.failures.labels(task, str(code)).inc()
        if seconds is not None:
            self.request_seconds.observe(seconds)
