"""Triton's extensions in-process on the synthetic repository: model repository (load/unload/index,
control modes, poll), statistics, model configuration, classification, metrics, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from fpt_deploy.serving import ServeConfig
from fpt_deploy.serving.server import ServerState, create_app

from fpt_deploy.artifacts import open_repository, repository_lock, write_json
from tests.serving.conftest import synthetic_inputs

LATE = "vec2"  # exported "after start-up": listed in the manifest only once the server runs


def infer_body(x: np.ndarray, outputs: list[dict] | None = None) -> bytes:
    datatype = "FP32" if x.dtype == np.float32 else "INT64"
    doc = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    if outputs is not None:
        doc["outputs"] = outputs
    return json.dumps(doc).encode()


def unlist(root, name: str):
    """Remove ``name`` from the manifest (its folder stays): what the repository looked like before its export."""
    with repository_lock(root):
        repo = open_repository(root)
        art = repo.tasks.pop(name)
        repo.save_manifest()
    return art


def relist(root, art) -> None:
    with repository_lock(root):
        write_json(root / art.files["input"].rsplit("/", 1)[0] / "task.json", art.to_json())
        repo = open_repository(root)
        repo.tasks[art.name] = art
        repo.save_manifest()


@pytest.fixture
def repo(synthetic_repo, tmp_path):
    root = shutil.copytree(synthetic_repo, tmp_path / "repo")
    return root, unlist(root, LATE)


def client_for(root, mode: str, load_model: list[str] | None = None, **settings):
    """A test client of a server in ``mode``; explicit mode loads every task (``--load-model *``) unless told."""
    from fastapi.testclient import TestClient

    if load_model is None:
        load_model = ["*"] if mode == "explicit" else []
    config = ServeConfig(
        repo=root,
        threads=1,
        max_queue_delay_ms=0,
        model_control_mode=mode,
        poll_interval=3600,
        load_model=load_model,
        **settings,
    )
    state = ServerState.load(config)
    return TestClient(create_app(state)), state


@pytest.fixture
def explicit(repo):
    root, late = repo
    client, state = client_for(root, "explicit")
    with client:
        yield client, state, root, late


def test_index_lists_every_task_with_its_state(explicit):
    client, state, root, late = explicit
    relist(root, late)  # exported while the server runs: listed, not yet loaded
    index = client.post("/v2/repository/index").json()
    states = {m["name"]: (m["state"], m["reason"]) for m in index}
    assert states == {"tok": ("READY", ""), "vec": ("READY", ""), LATE: ("UNAVAILABLE", "unloaded")}
    ready = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {m["name"] for m in ready} == {"tok", "vec"}


def test_explicit_mode_without_load_model_starts_with_no_task_and_loads_on_request(repo):
    root, late = repo
    relist(root, late)
    client, state = client_for(root, "explicit", load_model=[])
    with client:
        assert state.model.tasks == {}
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        index = client.post("/v2/repository/index").json()
        assert {m["name"]: (m["state"], m["reason"]) for m in index} == {
            name: ("UNAVAILABLE", "unloaded") for name in ("tok", "vec", LATE)
        }
        assert client.post("/v2/repository/index", json={"ready": True}).json() == []
        x = synthetic_inputs("vec", 2, np.random.default_rng(0))
        refused = client.post("/v2/models/vec/infer", content=infer_body(x))
        assert refused.status_code == 404 and "error" in refused.json()
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        answer = client.post("/v2/models/vec/infer", content=infer_body(x))
        assert answer.status_code == 200, answer.text
        assert np.isfinite(np.array(answer.json()["outputs"][0]["data"])).all()
        assert set(state.model.tasks) == {"vec"}


def test_load_model_names_the_tasks_loaded_at_start_up(repo):
    root, late = repo
    client, state = client_for(root, "explicit", load_model=["vec"])
    with client:
        assert set(state.model.tasks) == {"vec"}
        states = {m["name"]: m["state"] for m in client.post("/v2/repository/index").json()}
        assert states == {"vec": "READY", "tok": "UNAVAILABLE"}
        x = synthetic_inputs("tok", 1, np.random.default_rng(0))
        assert client.post("/v2/models/tok/infer", content=infer_body(x)).status_code == 404


def test_load_model_refuses_tasks_the_repository_lacks_naming_them_all(repo):
    from fpt_deploy.errors import UnknownNameError

    root, late = repo
    with pytest.raises(UnknownNameError) as caught:
        client_for(root, "explicit", load_model=["vec", "nope", LATE])
    message = str(caught.value)
    assert "'nope'" in message and repr(LATE) in message and "'vec'" not in message
    assert "its tasks: tok, vec" in message


def test_load_model_star_must_be_the_only_one(repo):
    from fpt_deploy.errors import ConfigError

    root, _ = repo
    with pytest.raises(ConfigError, match=r"--load-model \* .* must be the only"):
        ServeConfig(repo=root, model_control_mode="explicit", load_model=["*", "vec"])


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_model_outside_explicit_mode_is_ignored_with_a_warning(repo, mode, caplog):
    root, _ = repo
    with caplog.at_level("WARNING", logger="fpt_deploy.serving.repository"):
        client, state = client_for(root, mode, load_model=["vec"])
    with client:
        assert set(state.model.tasks) == {"tok", "vec"}  # every task, as Triton loads in these modes
    assert any("--load-model vec is ignored" in r.getMessage() for r in caplog.records)


def test_with_several_bodies_and_no_task_named_the_body_comes_from_fingerprint(repo):
    from fpt_deploy.errors import ConfigError

    root, _ = repo
    with repository_lock(root):
        listed = open_repository(root)
        (body,) = listed.backbones.values()
        listed.backbones["e" * 64] = dataclasses.replace(body, fingerprint="e" * 64)
        listed.save_manifest()
    with pytest.raises(ConfigError, match="--fingerprint"):
        client_for(root, "explicit", load_model=[])
    client, state = client_for(root, "explicit", load_model=[], fingerprint=body.fingerprint[:12])
    with client:
        assert state.model.tasks == {} and state.model.backbone.fingerprint == body.fingerprint
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        assert set(state.model.tasks) == {"vec"}


def test_a_task_exported_after_start_up_loads_serves_and_unloads(explicit):
    client, state, root, late = explicit
    x = synthetic_inputs(LATE, 3, np.random.default_rng(0))
    assert client.post(f"/v2/models/{LATE}/infer", content=infer_body(x)).status_code == 404
    relist(root, late)
    assert client.post(f"/v2/repository/models/{LATE}/load").status_code == 200
    answer = client.post(f"/v2/models/{LATE}/infer", content=infer_body(x))
    assert answer.status_code == 200, answer.text
    logits = np.array(answer.json()["outputs"][0]["data"]).reshape(3, 5)
    assert np.isfinite(logits).all()
    other = client.post(
        "/v2/models/vec/infer", content=infer_body(synthetic_inputs("vec", 2, np.random.default_rng(1)))
    )
    assert other.status_code == 200  # the tasks served before keep serving
    assert client.post(f"/v2/repository/models/{LATE}/unload").status_code == 200
    gone = client.post(f"/v2/models/{LATE}/infer", content=infer_body(x))
    assert gone.status_code == 404 and "error" in gone.json()
    assert {m["name"]: m["state"] for m in client.post("/v2/repository/index").json()}[LATE] == "UNAVAILABLE"
    assert client.post("/v2/models/vec/infer", content=other.request.content).status_code == 200


def test_load_errors_say_what_is_wrong(explicit):
    client, state, root, late = explicit
    missing = client.post("/v2/repository/models/nope/load")
    assert missing.status_code == 404 and "'nope' is not in" in missing.json()["error"]
    relist(root, dataclasses.replace(late, fingerprint="f" * 64))  # trained on another body
    foreign = client.post(f"/v2/repository/models/{LATE}/load")
    assert foreign.status_code == 400
    assert "trained on backbone ffffffffffffffff" in foreign.json()["error"]
    unload = client.post("/v2/repository/models/nope/unload")
    assert unload.status_code == 404 and "error" in unload.json()


def test_a_load_past_the_runtimes_capacity_fails_clearly_and_leaves_the_others_serving(explicit, monkeypatch):
    from fpt_deploy.errors import ConfigError

    client, state, root, late = explicit
    runtime = state.model.runtime
    publish = runtime.set_norm_tables
    loaded = len(state.model.tasks)

    def at_capacity(weight, bias):  # as the TensorRT runtime refuses tables beyond its --max-tasks
        if (weight.shape[0] if hasattr(weight, "shape") else len(weight)) > loaded:
            raise ConfigError(f"the engine's norm tables hold {loaded} tasks; rebuild it with --max-tasks {loaded + 1}")
        publish(weight, bias)

    monkeypatch.setattr(runtime, "set_norm_tables", at_capacity)
    relist(root, late)
    answer = client.post(f"/v2/repository/models/{LATE}/load")
    assert answer.status_code == 400 and "--max-tasks" in answer.json()["error"]
    assert LATE not in state.model.tasks
    x = synthetic_inputs("vec", 2, np.random.default_rng(0))
    assert client.post("/v2/models/vec/infer", content=infer_body(x)).status_code == 200


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_are_refused_outside_explicit_mode(repo, mode):
    root, late = repo
    client, _ = client_for(root, mode)
    with client:
        for action in ("load", "unload"):
            answer = client.post(f"/v2/repository/models/vec/{action}")
            assert answer.status_code == 400
            assert "not allowed" in answer.json()["error"] and "--model-control-mode" in answer.json()["error"]


def test_poll_mode_follows_the_manifest(repo):
    root, late = repo
    client, state = client_for(root, "poll")
    with client:
        relist(root, late)
        state.control.poll_once()
        assert LATE in state.model.tasks
        x = synthetic_inputs(LATE, 1, np.random.default_rng(0))
        assert client.post(f"/v2/models/{LATE}/infer", content=infer_body(x)).status_code == 200
        unlist(root, LATE)
        state.control.poll_once()
        assert LATE not in state.model.tasks


def test_statistics_count_requests_rows_and_backbone_executions(explicit):
    client, state, root, late = explicit
    rng = np.random.default_rng(0)
    for rows in (1, 2, 3):
        assert (
            client.post("/v2/models/vec/infer", content=infer_body(synthetic_inputs("vec", rows, rng))).status_code
            == 200
        )
    bad = client.post("/v2/models/vec/infer", content=infer_body(np.zeros((1, 2, 2), np.float32)))
    assert bad.status_code == 400
    stats = {m["name"]: m for m in client.get("/v2/models/stats").json()["model_stats"]}
    backbone = f"backbone-{state.model.backbone.fingerprint[:16]}"
    assert set(stats) == {"vec", "tok", backbone}
    vec = stats["vec"]
    assert vec["version"] == "1" and vec["inference_count"] == 6  # rows
    assert 1 <= vec["execution_count"] <= 3
    s = vec["inference_stats"]
    assert s["success"]["count"] == 3 and s["fail"]["count"] == 1
    for kind in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert s[kind]["count"] == 3 and s[kind]["ns"] > 0, kind
    batches = vec["batch_stats"]  # per rows-of-this-task in an execution, one count each
    assert sum(b["compute_infer"]["count"] for b in batches) == vec["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == 6
    assert stats[backbone]["execution_count"] >= vec["execution_count"]
    assert stats[backbone]["inference_count"] == 6
    assert stats["tok"]["inference_count"] == 0
    one = client.get("/v2/models/vec/stats").json()["model_stats"]
    assert [m["name"] for m in one] == ["vec"] and one[0]["inference_count"] == 6
    missing = client.get("/v2/models/nope/stats")
    assert missing.status_code == 404 and "error" in missing.json()


def test_model_config_in_tritons_shape(explicit):
    client, state, *_ = explicit
    config = client.get("/v2/models/vec/config").json()
    assert config["name"] == "vec" and config["max_batch_size"] == state.batcher.max_batch_size
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [4, 3]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["logits"]["dims"] == [3] and outputs["probabilities"]["data_type"] == "TYPE_FP32"
    assert outputs["labels"]["data_type"] == "TYPE_INT64"
    assert config["parameters"]["labels"] == {"string_value": "0,1,2"}
    assert client.get("/v2/models/nope/config").status_code == 404


def test_classification_returns_score_index_label_strings(explicit):
    client, *_ = explicit
    x = synthetic_inputs("vec", 2, np.random.default_rng(0))
    wanted = [{"name": "probabilities", "parameters": {"classification": 2}}, {"name": "probabilities"}]
    plain = client.post("/v2/models/vec/infer", content=infer_body(x, [{"name": "probabilities"}])).json()
    probs = np.array(plain["outputs"][0]["data"]).reshape(2, 3)
    answer = client.post("/v2/models/vec/infer", content=infer_body(x, wanted[:1]))
    assert answer.status_code == 200, answer.text
    out = answer.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    for row, strings in enumerate(np.array(out["data"]).reshape(2, 2)):
        parsed = [s.split(":") for s in strings]
        order = np.argsort(-probs[row])[:2]
        assert [int(p[1]) for p in parsed] == order.tolist()
        assert [p[2] for p in parsed] == [str(i) for i in order]  # the labels are "0", "1", "2"
        assert np.allclose([float(p[0]) for p in parsed], probs[row, order], atol=1e-6)
    labels = client.post(
        "/v2/models/vec/infer", content=infer_body(x, [{"name": "labels", "parameters": {"classification": 1}}])
    )
    assert labels.status_code == 400 and "classification" in labels.json()["error"]


def test_metrics_carry_tritons_series_per_task_and_the_process_collectors(explicit):
    client, *_ = explicit
    rng = np.random.default_rng(0)
    for task in ("vec", "tok"):
        assert (
            client.post(f"/v2/models/{task}/infer", content=infer_body(synthetic_inputs(task, 2, rng))).status_code
            == 200
        )
    text = client.get("/metrics").text
    for task in ("vec", "tok"):
        assert f'nv_inference_request_success{{model="{task}",version="1"}} 1.0' in text
        assert f'nv_inference_count{{model="{task}",version="1"}} 2.0' in text
        for series in (
            "nv_inference_exec_count",
            "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us",
        ):
            assert f'{series}{{model="{task}",version="1"}}' in text
        assert f'nv_inference_request_summary_us{{model="{task}",quantile="0.99",version="1"}}' in text
    assert "process_resident_memory_bytes" in text and "fpt_mixed_task_backbone_calls_total" in text


def test_unknown_routes_answer_an_error_body(explicit):
    client, *_ = explicit
    answer = client.get("/v2/nothing/here")
    assert answer.status_code == 404 and isinstance(answer.json()["error"], str)


def test_the_page_and_its_script_are_served(explicit):
    client, *_ = explicit
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    assert "nv_inference_request_summary_us" in client.get("/static/app.js").text
    assert client.get("/static/..%2Fserver.py").status_code == 404
