"""The executor and the dynamic batcher on the synthetic repository (tiny graphs, no torch)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fpt_deploy.serving import DynamicBatcher, MixedBatchExecutor, RuntimeConfig, ServingModel
from fpt_deploy.serving.errors import InvalidInputError, QueueFullError, ServerClosingError
from fpt_deploy.serving.executor import InferenceRequest, plan_length_groups, real_lengths
from fpt_deploy.serving.metrics import ServingMetrics

from fpt_deploy.errors import UnknownNameError


class CountingRuntime:
    """Wraps a runtime and records the rows, length and tasks of every backbone call."""

    def __init__(self, runtime) -> None:
        self.runtime, self.calls = runtime, []

    def run_backbone(self, hidden, attention_mask, task_index):
        self.calls.append((hidden.shape[0], hidden.shape[1], sorted(set(task_index.tolist()))))
        return self.runtime.run_backbone(hidden, attention_mask, task_index)


@pytest.fixture(scope="module")
def model(synthetic_repo):
    m = ServingModel(RuntimeConfig(repo=synthetic_repo, threads=1))
    yield m
    m.close()


def reference(model, task_name: str, raw: np.ndarray) -> np.ndarray:
    """The task alone, unpadded and untrimmed: input head -> backbone (its own norm rows) -> output head."""
    task = model.tasks[task_name]
    hidden, mask = task.run_input_head(raw)
    last = model.runtime.run_backbone(hidden, mask, np.full(len(raw), task.index, np.int64))
    return task.run_output_head(last, mask)


def test_mixed_tasks_share_one_backbone_call(model, make_inputs):
    rng = np.random.default_rng(0)
    runtime = CountingRuntime(model.runtime)
    metrics = ServingMetrics()
    executor = MixedBatchExecutor(runtime, pad_tolerance=0.0, metrics=metrics)
    batch = [InferenceRequest(model.tasks[t], make_inputs(t, n, rng)) for t, n in (("vec", 2), ("vec2", 3), ("vec", 1))]
    results = executor.run(batch)
    assert runtime.calls == [(6, 4, sorted({model.tasks["vec"].index, model.tasks["vec2"].index}))]
    for request, result in zip(batch, results, strict=True):
        np.testing.assert_allclose(result.logits, reference(model, request.task.name, request.inputs), atol=1e-5)
        assert result.logits.shape == (request.rows, 5 if request.task.name == "vec2" else 3)
        np.testing.assert_allclose(result.probabilities.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(result.labels, result.logits.argmax(-1))
    assert metrics.mixed_backbone_calls._value.get() == 1


@pytest.mark.parametrize("tolerance, max_calls", [(0.0, 7), (100.0, 1)])
def test_rows_grouped_by_length_and_padded(model, make_inputs, tolerance, max_calls):
    rng = np.random.default_rng(1)
    runtime = CountingRuntime(model.runtime)
    executor = MixedBatchExecutor(runtime, pad_tolerance=tolerance)
    batch = [
        InferenceRequest(model.tasks["tok"], make_inputs("tok", 9, rng)),
        InferenceRequest(model.tasks["vec"], make_inputs("vec", 3, rng)),
        InferenceRequest(model.tasks["tok"], make_inputs("tok", 4, rng)),
    ]
    results = executor.run(batch)
    assert 1 <= len(runtime.calls) <= max_calls
    if tolerance == 0.0:  # every call holds rows of one real length: no padding at all
        lengths = np.concatenate(
            [real_lengths(model.tasks["tok"].run_input_head(r.inputs)[1]) for r in batch if r.task.name == "tok"]
            + [np.full(3, 4)]
        )
        assert sorted(c[1] for c in runtime.calls) == sorted(set(lengths.tolist()))
        assert sum(c[0] for c in runtime.calls) == 16
    else:  # one padded call mixing both tasks, as long as the longest row
        assert runtime.calls[0][0] == 16 and len(runtime.calls[0][2]) == 2
    for request, result in zip(batch, results, strict=True):
        np.testing.assert_allclose(result.logits, reference(model, request.task.name, request.inputs), atol=1e-5)


def test_plan_length_groups_bounds_padding():
    lengths = np.array([10, 49, 10, 49, 48, 9])
    groups = plan_length_groups(lengths, tolerance=0.05)
    assert sorted(np.concatenate([g for g, _ in groups]).tolist()) == list(range(6))
    for rows, length in groups:
        assert length == lengths[rows].max()
        assert len(rows) * length <= 1.05 * lengths[rows].sum()
    assert len(groups) == 2  # {9, 10, 10} and {48, 49, 49}
    assert len(plan_length_groups(lengths, tolerance=10.0)) == 1


def test_real_lengths_ignore_holes_before_the_last_real_token():
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert real_lengths(mask).tolist() == [2, 3, 1, 4]


def test_one_bad_request_fails_alone(model, make_inputs):
    rng = np.random.default_rng(2)
    bad = make_inputs("tok", 2, rng)
    bad[0, 0] = 99  # past the vocabulary: the input head's Gather fails (check_input would refuse it)
    good = [
        InferenceRequest(model.tasks["tok"], make_inputs("tok", 3, rng)),
        InferenceRequest(model.tasks["vec"], make_inputs("vec", 2, rng)),
    ]
    batch = [good[0], InferenceRequest(model.tasks["tok"], bad), good[1]]
    MixedBatchExecutor(model.runtime)(batch)
    with pytest.raises(Exception, match="(?i)indices|out of|bounds"):
        batch[1].future.result(timeout=1)
    for request in good:
        np.testing.assert_allclose(
            request.future.result(timeout=1).logits, reference(model, request.task.name, request.inputs), atol=1e-5
        )


def test_batcher_mixes_tasks_from_many_threads(model, make_inputs):
    rng = np.random.default_rng(3)
    runtime = CountingRuntime(model.runtime)
    metrics = ServingMetrics()
    batcher = DynamicBatcher(
        MixedBatchExecutor(runtime, metrics=metrics), max_batch_size=8, max_queue_delay_ms=50, metrics=metrics
    )
    work = [(t, make_inputs(t, 1 + i % 2, rng)) for i, t in enumerate(["vec", "vec2", "tok"] * 8)]
    futures = [None] * len(work)

    def client(k: int) -> None:
        futures[k] = batcher.submit(model.tasks[work[k][0]], work[k][1])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    try:
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.close(5)
    for (task, raw), result in zip(work, results, strict=True):
        np.testing.assert_allclose(result.logits, reference(model, task, raw), atol=1e-5)
    assert all(rows <= 8 for rows, _, _ in runtime.calls)
    assert metrics.mixed_batches._value.get() >= 1  # 24 requests within 50 ms: batches held several tasks
    assert metrics.batch_rows._sum.get() == sum(len(raw) for _, raw in work)


def test_idle_batcher_starts_a_lone_request_at_once(model, make_inputs):
    # A 60 s delay: the result arriving within the 10 s timeout shows the request did not wait for it.
    batcher = DynamicBatcher(MixedBatchExecutor(model.runtime), max_batch_size=64, max_queue_delay_ms=60_000)
    try:
        batcher.submit(model.tasks["vec"], make_inputs("vec", 1, np.random.default_rng(4))).result(timeout=10)
    finally:
        batcher.close(5)


def test_queue_delay_applies_while_there_is_work_to_join(model, make_inputs):
    """After a batch of 3 rows, a lone request waits (up to the 60 s delay) for 3 rows to join it."""
    rng = np.random.default_rng(7)
    executor = MixedBatchExecutor(model.runtime)
    release, sizes = threading.Event(), []

    def execute(batch):
        release.wait(10)
        sizes.append(len(batch))
        executor(batch)

    batcher = DynamicBatcher(execute, max_batch_size=8, max_queue_delay_ms=60_000)
    try:
        first = batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng))  # idle: runs at once, held
        deadline = time.monotonic() + 5
        while batcher.queued and time.monotonic() < deadline:  # the worker has taken it
            time.sleep(0.005)
        joined = [batcher.submit(model.tasks["vec2"], make_inputs("vec2", 1, rng)) for _ in range(3)]
        release.set()
        for f in [first, *joined]:
            f.result(timeout=10)  # batches [1], [3]
        later = [batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng)) for _ in range(3)]
        for f in later:
            f.result(timeout=10)  # without the wait: [1], [2] or [1], [1], [1]
    finally:
        batcher.close(5)
    assert sizes == [1, 3, 3]


def test_removing_a_task_drains_its_requests_and_frees_its_rows(synthetic_repo, make_inputs):
    model = ServingModel(RuntimeConfig(repo=synthetic_repo, threads=1))
    release = threading.Event()
    executor = MixedBatchExecutor(model.runtime)

    def execute(batch):
        release.wait(10)
        executor(batch)

    batcher = DynamicBatcher(execute, max_batch_size=8, max_queue_delay_ms=0)
    rng = np.random.default_rng(8)
    try:
        vec = model.task("vec")
        row = vec.index
        pending = [batcher.submit(vec, make_inputs("vec", 1, rng)) for _ in range(3)]
        assert vec.pending == 3
        remover = threading.Thread(target=model.remove_task, args=("vec",))
        remover.start()
        deadline = time.monotonic() + 5
        while not vec.unloading and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(UnknownNameError, match="being unloaded"):
            batcher.submit(vec, make_inputs("vec", 1, rng))
        assert "vec" in model.tasks  # still draining: its requests are queued or running
        release.set()
        remover.join(10)
        assert all(f.result(timeout=1).logits.shape == (1, 3) for f in pending)  # every queued one answered
        assert "vec" not in model.tasks and vec.pending == 0 and not vec.resident
        with pytest.raises(UnknownNameError):
            model.task("vec")
        again = model.add_task("vec")  # the same single loading path as start-up
        assert again.index == row  # its freed norm row is reused
        raw = make_inputs("vec", 2, rng)
        np.testing.assert_allclose(
            batcher.submit(again, raw).result(timeout=10).logits, reference(model, "vec", raw), atol=1e-5
        )
    finally:
        release.set()
        batcher.close(5)
        model.close()


def test_full_queue_refuses_and_close_drains(model, make_inputs):
    release = threading.Event()
    executed = []
    executor = MixedBatchExecutor(model.runtime)

    def slow_execute(batch):
        release.wait(5)
        executed.append(len(batch))
        executor(batch)

    rng = np.random.default_rng(5)
    batcher = DynamicBatcher(slow_execute, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    first = batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng))
    deadline = time.monotonic() + 5
    while batcher.queued and time.monotonic() < deadline:  # the worker takes the first and blocks in it
        time.sleep(0.005)
    queued = [batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng)) for _ in range(2)]
    with pytest.raises(QueueFullError, match="queue is full"):
        batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng))
    release.set()
    batcher.close(10)
    assert all(f.done() and f.exception() is None for f in [first, *queued])
    assert executed == [1, 1, 1]
    with pytest.raises(ServerClosingError):
        batcher.submit(model.tasks["vec"], make_inputs("vec", 1, rng))


def test_oversized_request_is_refused(model, make_inputs):
    batcher = DynamicBatcher(MixedBatchExecutor(model.runtime), max_batch_size=4)
    try:
        with pytest.raises(InvalidInputError, match="between 1 and 4 rows"):
            batcher.submit(model.tasks["vec"], make_inputs("vec", 5, np.random.default_rng(6)))
    finally:
        batcher.close(5)


@pytest.mark.parametrize(
    "task, name, array, message",
    [
        ("vec", "x", np.zeros((1, 4, 3), np.float32), "has one input, 'input'"),
        ("vec", "input", np.zeros((1, 4, 3), np.float64), "must be FP32, got FP64"),
        ("vec", "input", np.zeros((1, 3, 4), np.float32), r"must have shape \[-1, 4, 3\], got \[1, 3, 4\]"),
        ("vec", "input", np.full((1, 4, 3), np.nan, np.float32), "NaN or inf"),
        ("vec", "input", np.zeros((9, 4, 3), np.float32), "between 1 and 8 rows"),
        ("tok", "input", np.full((1, 6), 7, np.int64), r"token ids that must lie in \[0, 7\)"),
        ("tok", "input", np.zeros((1, 6), np.int64), "at least one token"),
        ("tok", "input", np.array([[3, 0, 4, 0, 0, 0]], np.int64), "padding .id 0. only after the last token"),
    ],
)
def test_check_input_names_what_was_expected(model, task, name, array, message):
    with pytest.raises(InvalidInputError, match=message):
        model.tasks[task].check_input(name, array, max_rows=8)


def test_unknown_task_lists_the_served_ones(model):
    with pytest.raises(UnknownNameError, match="served here; models: tok, vec, vec2"):
        model.task("nope")
