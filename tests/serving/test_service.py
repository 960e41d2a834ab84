"""The protocol-neutral inference service: resolving, submitting, outputs, statuses, and the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from fpt_deploy.serving import RuntimeConfig, ServeConfig
from fpt_deploy.serving.errors import InvalidInputError, QueueFullError, ServerClosingError
from fpt_deploy.serving.protocol import MODEL_VERSION, InferRequest
from fpt_deploy.serving.service import InferenceService, build_pipeline, status_of

from fpt_deploy.errors import ConfigError, UnknownNameError


@pytest.fixture(scope="module")
def service(synthetic_repo):
    service = InferenceService.of(ServeConfig(repo=synthetic_repo, threads=1, max_batch_size=4))
    yield service
    service.close(5)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnknownNameError("no such model"), 404),
        (TimeoutError("drain"), 409),
        (QueueFullError("full"), 503),
        (ServerClosingError("closing"), 503),
        (InvalidInputError("bad"), 400),
        (ConfigError("bad option"), 400),
        (RuntimeError("bug"), 500),
    ],
)
def test_each_error_has_one_status(error, status):
    assert status_of(error) == status


def test_pipeline_settings_come_from_the_config_alone(synthetic_repo):
    config = RuntimeConfig(repo=synthetic_repo, threads=1)
    pipeline = build_pipeline(config, ["vec"])
    try:
        batcher = pipeline.batcher
        assert (batcher.max_batch_size, batcher.max_queue_size) == (config.max_batch_size, config.max_queue_size)
        assert batcher.max_queue_delay == config.max_queue_delay_ms / 1000 and batcher.max_queue_rows is None
        assert batcher.execute.pad_tolerance == config.pad_tolerance
        assert list(pipeline.model.tasks) == ["vec"]
    finally:
        pipeline.close()
    serve = ServeConfig(repo=synthetic_repo, threads=1, max_queue_rows=64, pad_tolerance=3.0)
    pipeline = build_pipeline(serve)
    try:
        assert pipeline.batcher.max_queue_rows == 64 and pipeline.batcher.execute.pad_tolerance == 3.0
    finally:
        pipeline.close()


def test_task_and_version_are_resolved_once(service):
    assert service.task("vec").name == service.task("vec", MODEL_VERSION).name == "vec"
    with pytest.raises(UnknownNameError, match="has only version 1, not '2'"):
        service.task("vec", "2")
    with pytest.raises(UnknownNameError, match="not served here"):
        service.task("nope")
    assert service.is_ready("vec", "") and not service.is_ready("vec", "2") and not service.is_ready("nope")
    assert service.label("nope") == "<unknown>" and service.label("vec") == "vec"


def test_submit_outputs_and_classification(service, make_inputs):
    task = service.task("vec")
    x = make_inputs("vec", 2, np.random.default_rng(0))
    result = service.submit(task, {"input": x}).result(30)
    every = service.outputs(task, result, InferRequest({"input": x}))
    assert [name for name, _, _ in every] == ["logits", "probabilities", "labels"]
    asked = InferRequest({"input": x}, outputs={"probabilities": True}, output_parameters={"probabilities": {}})
    asked.output_parameters["probabilities"]["classification"] = 2
    ((name, top, binary),) = service.outputs(task, result, asked)
    assert name == "probabilities" and binary and top.shape == (2, 2)
    best = int(result.probabilities[0].argmax())
    assert top[0, 0].decode().split(":")[1] == str(best)
    with pytest.raises(InvalidInputError, match="no output 'nope'"):
        service.outputs(task, result, InferRequest({"input": x}, outputs={"nope": False}))
    labels = InferRequest({"input": x}, outputs={"labels": False}, output_parameters={"labels": {"classification": 1}})
    with pytest.raises(InvalidInputError, match="holds class indices"):
        service.outputs(task, result, labels)
    with pytest.raises(InvalidInputError, match="must be FP32"):
        service.submit(task, {"input": x.astype(np.float64)})


def test_contracts_cover_listed_tasks_and_metadata_agrees(service):
    contracts = {c.model: c for c in service.contracts()}
    assert set(contracts) >= set(service.model.tasks)
    task = service.task("tok")
    meta, config = service.metadata(task), service.model_config(task)
    assert meta["inputs"][0]["shape"] == [-1, *contracts["tok"].example_shape] == [-1, *config["input"][0]["dims"]]
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in config["output"]]
    assert config["max_batch_size"] == contracts["tok"].max_rows == 4
