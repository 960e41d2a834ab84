"""Repository control that cannot wedge: each task in one state (loading, ready, unloading, unavailable).

A timed-out unload leaves the task serving, never listed READY while refusing requests; a broken task
file is that task's 400 (and its UNAVAILABLE reason), never a 500, never other tasks' failure, never a
dead poller; ``load`` reloads when anything in the task file changed; load and unload parameters the
server cannot apply are refused by name. Everything goes through the HTTP API (and the gRPC servicer).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fpt_deploy.serving import ServeConfig

from fpt_deploy.artifacts import open_repository, read_json, repository_lock, task_dir, write_json
from tests.serving.conftest import synthetic_inputs
from tests.serving.test_extensions import LATE, client_for, infer_body, unlist

BAD = "bad"  # a task whose task.json is broken: a copy of vec's entry, listed under its own folder


@pytest.fixture
def repo(synthetic_repo, tmp_path):
    root = shutil.copytree(synthetic_repo, tmp_path / "repo")
    return root, unlist(root, LATE)


def list_task(root, doc: dict) -> None:
    """Write task file ``doc`` into its folder and list it in the manifest, reading no other task file
    (``relist`` reopens the whole repository, which a broken task file would stop)."""
    name = doc["name"]
    with repository_lock(root):
        write_json(root / task_dir(name) / "task.json", doc)
        manifest = read_json(root / "manifest.json", "manifest")
        manifest["tasks"][name] = {"file": f"{task_dir(name)}/task.json", "fingerprint": doc["fingerprint"]}
        write_json(root / "manifest.json", manifest)


def list_broken(root, part: str) -> None:
    """List task BAD: vec's files with a task.json whose input shape is "ab", in its I/O contract
    (``part="input"``: the file parses, the contract is wrong) or in its spec (``"spec"``: it does not parse)."""
    doc = dataclasses.replace(open_repository(root).tasks["vec"], name=BAD).to_json()
    if part == "input":
        doc["input"]["shape"] = "ab"
    else:
        doc["spec"]["input_shape"] = "ab"
    list_task(root, doc)


def index_of(client) -> dict:
    return {m["name"]: (m["state"], m["reason"]) for m in client.post("/v2/repository/index").json()}


def infer(client, task: str, rows: int = 1, seed: int = 0):
    x = synthetic_inputs(task, rows, np.random.default_rng(seed))
    return client.post(f"/v2/models/{task}/infer", content=infer_body(x))


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_unload_that_times_out_leaves_the_task_serving_never_ready_and_refusing(repo):
    root, _ = repo
    client, state = client_for(root, "explicit")
    gate, entered = threading.Event(), threading.Event()
    execute = state.batcher.execute

    def held(batch):  # the first batch waits, as a request in a long queue delay would
        entered.set()
        gate.wait(10)
        execute(batch)

    state.batcher.execute = held
    state.control.unload_timeout = 0.5
    with client, ThreadPoolExecutor(2) as pool:
        try:
            waiting = pool.submit(infer, client, "vec")
            assert entered.wait(10)
            unloading = pool.submit(client.post, "/v2/repository/models/vec/unload")
            # while it drains it is UNLOADING, and not ready: never READY in the index while refusing
            assert wait_for(lambda: index_of(client)["vec"][0] != "READY" or unloading.done())
            ready = client.get("/v2/models/vec/ready").status_code
            if index_of(client)["vec"][0] == "UNLOADING":  # still draining after the ready call (no race)
                assert ready != 200
            unload = unloading.result(10)
            assert unload.status_code == 409, unload.text
            assert "keeps serving" in unload.json()["error"]
            assert index_of(client)["vec"] == ("READY", "")
            assert client.get("/v2/models/vec/ready").status_code == 200
            assert client.post("/v2/repository/models/vec/load").status_code == 200
        finally:
            gate.set()
        assert waiting.result(10).status_code == 200
        answer = infer(client, "vec", seed=1)
        assert answer.status_code == 200, answer.text  # the issue: 404 "being unloaded" for good
        assert client.post("/v2/repository/models/vec/unload").status_code == 200  # nothing in flight now
        assert index_of(client)["vec"] == ("UNAVAILABLE", "unloaded")
        assert infer(client, "vec").status_code == 404


@pytest.mark.parametrize("part", ["input", "spec"])
def test_a_broken_task_file_is_that_tasks_400_and_every_other_task_still_loads(repo, part):
    root, late = repo
    client, state = client_for(root, "explicit")
    with client:
        list_broken(root, part)
        refused = client.post(f"/v2/repository/models/{BAD}/load")
        assert refused.status_code == 400, refused.text  # not 500
        assert "input" in refused.json()["error"] and "shape" in refused.json()["error"]
        state_, reason = index_of(client)[BAD]
        assert state_ == "UNAVAILABLE" and "shape" in reason
        list_task(root, late.to_json())
        assert client.post(f"/v2/repository/models/{LATE}/load").status_code == 200  # not 400
        assert client.post("/v2/repository/models/vec/unload").status_code == 200
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        for task in ("vec", "tok", LATE):
            assert infer(client, task).status_code == 200, task
        assert {name: s for name, (s, _) in index_of(client).items()} == {
            "vec": "READY",
            "tok": "READY",
            LATE: "READY",
            BAD: "UNAVAILABLE",
        }
        doc = read_json(root / task_dir("vec") / "task.json", "task file")
        doc["input"]["shape"] = "ab"
        list_task(root, doc)  # a served task's file breaks: the load is refused, the loaded version serves on
        assert client.post("/v2/repository/models/vec/load").status_code == 400
        assert infer(client, "vec").status_code == 200 and index_of(client)["vec"] == ("READY", "")


@pytest.mark.parametrize("part", ["input", "spec"])
def test_a_broken_task_file_at_start_up_leaves_that_task_unavailable_and_serves_the_others(repo, part):
    root, _ = repo
    list_broken(root, part)
    client, state = client_for(root, "none")
    with client:
        assert set(state.model.tasks) == {"vec", "tok"}
        assert infer(client, "vec").status_code == 200
        state_, reason = index_of(client)[BAD]
        assert state_ == "UNAVAILABLE" and "shape" in reason


@pytest.mark.parametrize("part", ["input", "spec"])
def test_the_poller_survives_a_broken_task_file_and_loads_later_tasks(repo, part):
    root, late = repo
    config = ServeConfig(repo=root, threads=1, max_queue_delay_ms=0, model_control_mode="poll", poll_interval=0.02)
    from fastapi.testclient import TestClient
    from fpt_deploy.serving.server import ServerState, create_app

    state = ServerState.load(config)
    with TestClient(create_app(state)) as client:
        list_broken(root, part)
        assert wait_for(lambda: "shape" in index_of(client).get(BAD, ("", ""))[1])
        list_task(root, late.to_json())
        assert wait_for(lambda: LATE in state.model.tasks), "the poller stopped: a later task never loaded"
        assert state.control._poller.is_alive()
        assert infer(client, LATE).status_code == 200
        assert index_of(client)[BAD][0] == "UNAVAILABLE"


def test_a_changed_task_file_is_reloaded_and_an_unchanged_one_is_not(repo):
    root, _ = repo
    client, state = client_for(root, "explicit")
    with client:
        before = state.model.tasks["vec"]
        art = open_repository(root).tasks["vec"]
        list_task(root, art.to_json())  # rewritten, the same contents
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        assert state.model.tasks["vec"] is before
        spec = dataclasses.replace(art.spec, labels=("cat", "dog", "eel"))
        output = art.output | {"name": "scores"}
        list_task(root, dataclasses.replace(art, spec=spec, labels=list(spec.labels), output=output).to_json())
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        config = client.get("/v2/models/vec/config").json()
        assert config["parameters"]["labels"] == {"string_value": "cat,dog,eel"}
        answer = infer(client, "vec")
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["name"] == "scores"
        body = infer_body(
            synthetic_inputs("vec", 1, np.random.default_rng(0)),
            [{"name": "probabilities", "parameters": {"classification": 1}}],
        )
        top = client.post("/v2/models/vec/infer", content=body).json()["outputs"][0]["data"][0]
        assert top.split(":")[2] in ("cat", "dog", "eel")


def test_reloads_and_broken_tasks_under_max_resident_tasks_keep_every_task_serving_its_version(repo):
    root, _ = repo
    client, state = client_for(root, "explicit", max_batch_size=1, max_resident_tasks=1)  # one task's rows
    with client:
        assert infer(client, "tok").status_code == 200  # tok holds the one resident row; vec is paged out
        assert not state.model.tasks["vec"].resident
        art = open_repository(root).tasks["vec"]
        spec = dataclasses.replace(art.spec, labels=("cat", "dog", "eel"))
        list_task(root, dataclasses.replace(art, spec=spec, labels=list(spec.labels)).to_json())
        list_broken(root, "input")
        assert client.post(f"/v2/repository/models/{BAD}/load").status_code == 400
        assert client.post("/v2/repository/models/vec/load").status_code == 200
        for task in ("vec", "tok", "vec"):
            assert infer(client, task).status_code == 200, task
        assert client.get("/v2/models/vec/config").json()["parameters"]["labels"]["string_value"] == "cat,dog,eel"
        assert state.model.resident_tasks == 1


REFUSED_PARAMETERS = [  # (action, request body, what the 400 must name)
    ("load", {"parameters": {"config": '{"max_batch_size": 2}'}}, "'config'"),
    ("load", {"parameters": {"file:1/model.onnx": "AAAA"}}, "'file:1/model.onnx'"),
    ("load", {"parameters": {"priority": 1}}, "'priority'"),
    ("load", {"parameters": "config"}, "'parameters'"),
    ("load", {"config": {}}, "'config'"),
    ("unload", {"parameters": {"unload_dependents": "yes"}}, "'unload_dependents'"),
    ("unload", {"parameters": {"force": True}}, "'force'"),
]


def test_load_and_unload_parameters_the_server_cannot_apply_are_refused_by_name(repo):
    root, _ = repo
    client, state = client_for(root, "explicit")
    with client:
        before = state.model.tasks["vec"]
        for action, body, named in REFUSED_PARAMETERS:
            answer = client.post(f"/v2/repository/models/vec/{action}", json=body)
            assert answer.status_code == 400, (action, body, answer.text)
            assert named in answer.json()["error"], (action, body)
            assert state.model.tasks["vec"] is before  # refused before anything changed
        ok = client.post("/v2/repository/models/vec/unload", json={"parameters": {"unload_dependents": True}})
        assert ok.status_code == 200 and "vec" not in state.model.tasks


def test_grpc_load_with_a_config_is_refused_not_ignored(repo):
    import grpc
    from fpt_deploy.serving.grpc_server import InferenceServicer
    from tritonclient.grpc import service_pb2

    root, late = repo
    client, state = client_for(root, "explicit")

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code, details):
            self.code, self.details = code, details
            raise Aborted

    list_task(root, late.to_json())
    with client:
        servicer, context = InferenceServicer(state.service, state.control, state.budget), Context()
        config = service_pb2.ModelRepositoryParameter(string_param='{"max_batch_size": 2}')
        request = service_pb2.RepositoryModelLoadRequest(model_name=LATE, parameters={"config": config})
        with pytest.raises(Aborted):
            servicer.RepositoryModelLoad(request, context)
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "'config'" in context.details
        assert LATE not in state.model.tasks
