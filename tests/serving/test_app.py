"""The HTTP app in-process (FastAPI's TestClient) on the synthetic repository: the states a live test can't force."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from fpt_deploy.serving import ServeConfig

from tests.serving.conftest import gated_client


def body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    ).encode()


@pytest.fixture
def gated_app(synthetic_repo):
    """An app whose batcher holds every batch until ``gate`` is set; one request may wait in its queue."""
    config = ServeConfig(repo=synthetic_repo, threads=1, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1)
    with gated_client(config, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1) as gated:
        yield gated


def test_full_queue_answers_503_and_recovers(gated_app):
    client, state, gate, entered = gated_app
    x = np.ones((1, 4, 3), np.float32)
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(client.post("/v2/models/vec/infer", content=body(x))))
        for _ in range(2)
    ]
    threads[0].start()
    assert entered.wait(10)  # the first request is executing, held at the gate
    threads[1].start()
    for _ in range(1000):  # the second waits in the queue
        if state.batcher.queued == 1:
            break
        gate.wait(0.01)
    assert state.batcher.queued == 1
    full = client.post("/v2/models/vec/infer", content=body(x))
    assert full.status_code == 503 and "queue is full" in full.json()["error"]
    gate.set()
    for t in threads:
        t.join(10)
    assert [a.status_code for a in answers] == [200, 200]
    assert client.post("/v2/models/vec/infer", content=body(x)).status_code == 200


def test_not_ready_once_closing(gated_app):
    client, state, gate, _ = gated_app
    assert client.get("/v2/health/ready").status_code == 200
    gate.set()
    state.close(5)
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    answer = client.post("/v2/models/vec/infer", content=body(np.ones((1, 4, 3), np.float32)))
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]


def test_max_resident_tasks_pages_rows_in_and_metrics_show_it(synthetic_repo, make_inputs):
    """One task's rows in memory at a time: every other request reads its task's rows back, same answers."""
    import re

    from fastapi.testclient import TestClient
    from fpt_deploy.serving.server import ServerState, create_app

    from tests.serving.conftest import SYNTHETIC_TASKS

    rng = np.random.default_rng(5)
    names = sorted(SYNTHETIC_TASKS)
    inputs = {n: make_inputs(n, 1, rng) for n in names}

    def infer(client, name):
        x = inputs[name]
        datatype = "FP32" if x.dtype == np.float32 else "INT64"
        doc = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}]}
        answer = client.post(f"/v2/models/{name}/infer", json=doc)
        assert answer.status_code == 200, answer.text
        return np.array(answer.json()["outputs"][0]["data"])

    answers = {}
    for resident in (None, 1):
        config = ServeConfig(repo=synthetic_repo, threads=1, max_batch_size=1, max_resident_tasks=resident)
        state = ServerState.load(config)
        with TestClient(create_app(state)) as client:
            answers[resident] = [infer(client, n) for n in names * 2]
            metrics = client.get("/metrics").text
        state.close(5)
        if resident == 1:
            assert state.model.resident_tasks == 1
            page_ins = float(re.search(r"^fpt_task_page_ins_total (\S+)$", metrics, re.M).group(1))
            assert page_ins == 2 * len(names) - 1  # every request but the first task's first found rows missing
            assert re.search(r"^fpt_resident_tasks 1\.0$", metrics, re.M)
    for paged, every in zip(answers[1], answers[None], strict=True):
        np.testing.assert_allclose(paged, every, atol=1e-6)
