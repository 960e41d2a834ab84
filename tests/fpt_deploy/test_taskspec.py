"""The torch-free task contract: TaskSpec, declared options parsed by type, typed artifact records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from fpt_deploy.artifacts import TASK_FORMAT, BackboneArtifact, Repository, TaskArtifact
from fpt_deploy.errors import ArtifactError, ConfigError, FingerprintMismatchError
from fpt_deploy.taskspec import TaskOption, TaskSpec, parse_option_value, parse_task_options

BITS = TaskSpec(
    name="bits",
    input_shape=(10,),
    input_dtype="uint8",
    seq_len=10,
    token_dim=1,
    num_classes=2,
    read_tokens=5,
    labels=("0", "1"),
    options={"n": 5},
)

# A task.json exactly as the previous version wrote it: the spec as a plain dict, every field given.
PREVIOUS_TASK_JSON = {
    "format": TASK_FORMAT,
    "name": "bit-xor",
    "fingerprint": "ab" * 32,
    "spec": {
        "name": "bit-xor",
        "input_shape": [10],
        "input_dtype": "uint8",
        "seq_len": 10,
        "token_dim": 1,
        "vocab_size": 0,
        "num_classes": 2,
        "read_tokens": 5,
        "outputs_per_token": 1,
        "labels": ["0", "1"],
        "options": {"n": 5, "train_size": 10000, "test_size": 1000},
    },
    "input": {"name": "input", "shape": [-1, 10], "dtype": "uint8"},
    "output": {"name": "logits", "shape": [-1, 5, 2], "dtype": "float32"},
    "labels": ["0", "1"],
    "files": {"input": "tasks/bit-xor/input.onnx", "output": "tasks/bit-xor/output.onnx", "norms": "n.npz"},
    "sha256": {"input": "0", "output": "0", "norms": "0"},
    "metrics": {},
}


def test_spec_is_keyword_only_and_knows_its_logits_shape():
    with pytest.raises(TypeError):
        TaskSpec("bits", (10,), "uint8", 10)  # positional arguments are refused
    assert BITS.num_outputs == 5 and BITS.logits_shape == (5, 2)
    mnist = TaskSpec(
        name="mnist",
        input_shape=(28, 28),
        input_dtype="uint8",
        seq_len=49,
        token_dim=16,
        num_classes=10,
        labels="0123456789",
    )
    assert mnist.logits_shape == (10,) and mnist.labels[3] == "3"


def test_spec_json_round_trip_gives_an_equal_spec():
    data = json.loads(json.dumps(BITS.to_json()))
    assert data["input_shape"] == [10]  # JSON lists; the spec holds tuples again
    assert TaskSpec.from_json(data) == BITS


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": ["0"]}, "1 labels for 2 classes"),
        ({"token_dim": 0}, "exactly one of token_dim"),
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"colour": "red"}, "unknown fields colour"),
    ],
)
def test_a_bad_spec_names_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        TaskSpec.from_json({**BITS.to_json(), **change})


@pytest.mark.parametrize(
    "kind, raw, expected",
    [
        (bool, "false", False),
        (bool, "FALSE", False),
        (bool, "no", False),
        (bool, "0", False),
        (bool, "yes", True),
        (bool, "1", True),
        (bool, "True", True),
        (bool, True, True),
        (int, "100", 100),
        (int, " 7 ", 7),
        (int, 3, 3),
        (float, "0.25", 0.25),
        (float, 1, 1.0),
        (str, "abc", "abc"),
    ],
)
def test_option_values_parse_by_declared_type(kind, raw, expected):
    value = parse_option_value("x", kind, raw)
    assert value == expected and type(value) is kind


@pytest.mark.parametrize(
    "kind, raw, message",
    [
        (bool, "maybe", "option x='maybe' must be true or false"),
        (int, "1.5", "option x='1.5' must be an integer"),
        (int, True, "must be an integer"),
        (float, "fast", "option x='fast' must be a number"),
    ],
)
def test_a_bad_option_value_names_the_option_and_the_value(kind, raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_option_value("x", kind, raw)


def test_task_options_report_every_problem_at_once():
    declared = {"n": TaskOption(type=int, default=5), "shuffle": TaskOption(type=bool, default=True)}
    assert parse_task_options("t", declared, {"shuffle": "false"}) == {"n": 5, "shuffle": False}
    with pytest.raises(ConfigError) as e:
        parse_task_options("t", declared, {"n": "many", "colour": "red"})
    assert "no option colour" in str(e.value) and "n='many'" in str(e.value)
    with pytest.raises(TypeError):
        TaskOption(type=list, default=[])


def test_a_built_in_task_parses_its_options_by_type():
    from fpt_deploy.tasks import get_task

    task = get_task("bit-memory", n="100", patch="10", mask_prob="0.3")
    assert task.options["n"] == 100 and task.options["mask_prob"] == 0.3
    assert task.spec.options == task.options and task.spec.logits_shape == (100 // 10 * 10, 2)
    with pytest.raises(ConfigError, match="option n='ten' must be an integer"):
        get_task("bit-xor", n="ten")


def test_the_previous_task_json_still_reads_into_a_typed_spec(tmp_path):
    art = TaskArtifact.from_json(PREVIOUS_TASK_JSON, tmp_path / "task.json")
    assert isinstance(art.spec, TaskSpec) and art.spec.logits_shape == (5, 2)
    assert art.spec.options["n"] == 5
    written = json.loads(json.dumps(art.to_json()))
    assert {k: written[k] for k in PREVIOUS_TASK_JSON} == PREVIOUS_TASK_JSON  # every old field written back as it was
    broken = {**PREVIOUS_TASK_JSON, "spec": {**PREVIOUS_TASK_JSON["spec"], "num_classes": "two"}}
    with pytest.raises(ArtifactError, match="re-run `fpt-deploy export`"):
        TaskArtifact.from_json(broken, tmp_path / "task.json")


def _backbone(seed: str) -> BackboneArtifact:
    fp = hashlib.sha256(seed.encode()).hexdigest()
    return BackboneArtifact(
        fingerprint=fp, name=seed, hidden_size=8, num_norms=2, norm_names=[], files={}, sha256={}, opset=18
    )


def _task(name: str, fingerprint: str) -> TaskArtifact:
    return TaskArtifact(
        name=name, fingerprint=fingerprint, spec=BITS, input={}, output={}, labels=[], files={}, sha256={}
    )


def test_find_backbone_by_prefix_or_by_the_tasks(tmp_path):
    a, b = _backbone("a"), _backbone("b")
    repo = Repository(root=tmp_path, backbones={a.fingerprint: a, b.fingerprint: b})
    repo.tasks = {"x": _task("x", a.fingerprint), "y": _task("y", b.fingerprint)}
    assert repo.find_backbone(a.fingerprint[:6]) is a
    assert repo.find_backbone(tasks=["y"]) is b
    with pytest.raises(ConfigError, match="holds 2 backbones"):
        repo.find_backbone()
    with pytest.raises(ConfigError, match="matches 0 of the backbones"):
        repo.find_backbone("zzzz")
    only_a = Repository(root=tmp_path, backbones={a.fingerprint: a})
    assert only_a.find_backbone() is a  # no task yet: its only backbone
    only_a.tasks = {"y": _task("y", b.fingerprint)}
    with pytest.raises(FingerprintMismatchError):
        only_a.find_backbone()
    with pytest.raises(ArtifactError, match="holds no backbone"):
        Repository(root=tmp_path).find_backbone()


def test_taskspec_and_artifacts_import_without_torch():
    code = "import sys, fpt_deploy.taskspec, fpt_deploy.artifacts; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
