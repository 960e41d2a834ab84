"""tritonclient (HTTP and gRPC) against a live server: the calls a Triton user makes, each checked.

Repository index, load of a task exported after start-up, infer on it, statistics, model config,
classification, unload; over gRPC also health and metadata. Both protocols share one batcher.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from fpt_deploy.serving import ServeConfig

from tests.serving.conftest import synthetic_inputs
from tests.serving.live import live_server
from tests.serving.test_extensions import LATE, relist, unlist

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc,http] (pip install -e '.[dev]')")


@pytest.fixture
def server(synthetic_repo, tmp_path):
    root = shutil.copytree(synthetic_repo, tmp_path / "repo")
    late = unlist(root, LATE)
    config = ServeConfig(repo=root, threads=1, max_queue_delay_ms=1, model_control_mode="explicit", load_model=["*"])
    with live_server(config) as live:
        yield live, root, late


def client_of(protocol: str, live):
    if protocol == "http":
        import tritonclient.http as tc

        return tc, tc.InferenceServerClient(live.http_url)
    import tritonclient.grpc as tc

    return tc, tc.InferenceServerClient(live.grpc_url)


def infer(tc, client, task: str, x: np.ndarray, outputs=None):
    inp = tc.InferInput("input", list(x.shape), "FP32" if x.dtype == np.float32 else "INT64")
    inp.set_data_from_numpy(x)
    return client.infer(task, [inp], outputs=outputs)


def index_of(client, protocol: str) -> dict:
    index = client.get_model_repository_index(**({"as_json": True} if protocol == "grpc" else {}))
    models = index["models"] if protocol == "grpc" else index
    return {m["name"]: m.get("state", "") for m in models}


def as_json(protocol: str) -> dict:
    return {"as_json": True} if protocol == "grpc" else {}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_drives_the_model_repository_statistics_config_and_classification(server, protocol):
    live, root, late = server
    tc, client = client_of(protocol, live)
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready()
    assert index_of(client, protocol) == {"tok": "READY", "vec": "READY"}
    relist(root, late)  # the task is exported while the server runs
    assert index_of(client, protocol)[LATE] == "UNAVAILABLE"
    client.load_model(LATE)
    assert client.is_model_ready(LATE) and index_of(client, protocol)[LATE] == "READY"

    x = synthetic_inputs(LATE, 3, np.random.default_rng(0))
    probs = infer(tc, client, LATE, x, [tc.InferRequestedOutput("probabilities")]).as_numpy("probabilities")
    assert probs.shape == (3, 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)

    top = infer(tc, client, LATE, x, [tc.InferRequestedOutput("probabilities", class_count=2)]).as_numpy(
        "probabilities"
    )
    assert top.shape == (3, 2)
    for row, entries in enumerate(top):
        score, index, label = entries[0].decode().split(":")
        assert int(index) == probs[row].argmax() and label == str(probs[row].argmax())
        assert abs(float(score) - probs[row].max()) < 1e-5

    stats = client.get_inference_statistics(LATE, **as_json(protocol))["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == LATE
    assert int(stats[0]["inference_count"]) == 6 and int(stats[0]["inference_stats"]["success"]["count"]) == 2
    every = {m["name"] for m in client.get_inference_statistics(**as_json(protocol))["model_stats"]}
    assert {"vec", "tok", LATE} < every

    config = client.get_model_config(LATE, **as_json(protocol))
    config = config["config"] if protocol == "grpc" else config
    assert config["name"] == LATE and config["input"][0]["dims"] in ([4, 3], ["4", "3"])

    client.unload_model(LATE)
    assert not client.is_model_ready(LATE)
    with pytest.raises(InferenceServerException, match="not served"):
        infer(tc, client, LATE, x)


def test_grpc_metadata_errors_and_one_shared_batcher(server):
    live, *_ = server
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    g = grpcclient.InferenceServerClient(live.grpc_url)
    meta = g.get_server_metadata(as_json=True)
    assert meta["name"] == "fpt-deploy" and "model_repository" in meta["extensions"]
    model = g.get_model_metadata("vec", as_json=True)
    assert model["inputs"][0]["datatype"] == "FP32" and model["inputs"][0]["shape"] == ["-1", "4", "3"]
    with pytest.raises(InferenceServerException, match="must have shape"):
        infer(grpcclient, g, "vec", np.zeros((1, 2, 2), np.float32))
    with pytest.raises(InferenceServerException, match="not served"):
        g.get_model_config("nope")
    with pytest.raises(InferenceServerException, match="is not in"):  # no such task in the repository
        g.load_model("nope")

    # Requests over both protocols at once land in one batcher: the task's counts add up across them.
    rng = np.random.default_rng(0)
    x = synthetic_inputs("vec", 2, rng)
    expected = infer(grpcclient, g, "vec", x).as_numpy("logits")
    errors = []

    def hammer(protocol: str):
        try:
            tc, client = client_of(protocol, live)  # tritonclient.http's client stays in its own thread
            for _ in range(10):
                np.testing.assert_allclose(infer(tc, client, "vec", x).as_numpy("logits"), expected, atol=1e-6)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(protocol,)) for protocol in ("grpc", "http")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = g.get_inference_statistics("vec", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == 21
