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
