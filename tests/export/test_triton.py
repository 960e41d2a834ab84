"""The Triton model repository: configs parse into Triton's ModelConfig, ensembles are wired to real
tensors, and input head (with its norm rows) -> backbone -> output head reproduces the PyTorch logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the dev extra) for ModelConfig")

from fpt_deploy.export.triton import TritonConfig, add_norm_outputs, write_triton_repository  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from fpt_deploy.errors import ArtifactError, ConfigError, UnknownNameError  # noqa: E402

TASKS = ("mnist", "bit-xor")


@pytest.fixture(scope="module")
def deploy_repo(exported_repo, tmp_path_factory) -> Path:
    """A copy of the exported tiny-bert repository (mnist, bit-xor; tests/conftest.py)."""
    return Path(shutil.copytree(exported_repo, tmp_path_factory.mktemp("deploy") / "repo"))


@pytest.fixture(scope="module")
def triton_repo(deploy_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    return write_triton_repository(
        TritonConfig(repo=deploy_repo, out=out, max_batch_size=32, preferred_batch_size=(8, 32))
    )


def _configs(root: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(root.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name, f"{path}: name {config.name!r} is not its folder's"
        configs[config.name] = config
    return configs


def test_every_config_parses_into_triton_model_config(triton_repo):
    configs = _configs(triton_repo.out)
    backbone = triton_repo.backbones[0]
    assert set(configs) == {backbone, *TASKS, *(f"{t}_{h}" for t in TASKS for h in ("input", "output"))}
    bb = configs[backbone]
    assert bb.platform == "onnxruntime_onnx" and bb.max_batch_size == 32
    assert bb.HasField("dynamic_batching") and list(bb.dynamic_batching.preferred_batch_size) == [8, 32]
    assert [i.name for i in bb.input] == ["hidden", "attention_mask", "norm_weight", "norm_bias"]
    dims = {i.name: list(i.dims) for i in bb.input}
    # batch dim excluded: hidden (L, D), mask (L), norms (N_norm, D); tiny-bert: D=32, 2 layers -> 5 norms
    assert dims == {"hidden": [-1, 32], "attention_mask": [-1], "norm_weight": [5, 32], "norm_bias": [5, 32]}
    assert bb.input[1].data_type == model_config_pb2.TYPE_INT64
    for task in TASKS:
        assert configs[task].platform == "ensemble" and len(configs[task].ensemble_scheduling.step) == 3
        assert (triton_repo.out / task / "1").is_dir()  # Triton needs a version folder for ensembles too
    assert configs["mnist"].input[0].data_type == model_config_pb2.TYPE_UINT8
    assert list(configs["mnist"].input[0].dims) == [28, 28]


def test_ensembles_map_real_tensors_of_their_models(triton_repo):
    configs = _configs(triton_repo.out)
    for task in TASKS:
        ensemble = configs[task]
        available = {i.name: (i.data_type, list(i.dims)) for i in ensemble.input}
        for step in ensemble.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs = {i.name: (i.data_type, list(i.dims)) for i in model.input}
            outputs = {o.name: (o.data_type, list(o.dims)) for o in model.output}
            assert set(step.input_map) == set(inputs), f"{task}: {step.model_name} inputs not all fed"
            for key, tensor in step.input_map.items():
                assert tensor in available, f"{task}: {step.model_name}.{key} reads {tensor!r}, which no step made"
                have, want = available[tensor], inputs[key]
                assert have[0] == want[0], f"{task}: {tensor} dtype {have[0]} feeds {key} of dtype {want[0]}"
                assert all(a == b or -1 in (a, b) for a, b in zip(have[1], want[1], strict=True)), (task, key)
            for key, tensor in step.output_map.items():
                assert key in outputs, f"{task}: {step.model_name} has no output {key!r}"
                available[tensor] = outputs[key]
        for out in ensemble.output:
            assert out.name in available and available[out.name][0] == out.data_type


def test_config_io_matches_the_onnx_graphs(triton_repo):
    import onnx

    for name, config in _configs(triton_repo.out).items():
        if config.platform == "ensemble":
            continue
        graph = onnx.load(str(triton_repo.out / name / "1" / "model.onnx"), load_external_data=False).graph
        assert [i.name for i in config.input] == [i.name for i in graph.input], name
        assert [o.name for o in config.output] == [o.name for o in graph.output], name


@pytest.mark.parametrize("task", TASKS)
def test_triton_graphs_reproduce_pytorch_logits(triton_repo, tiny_checkpoints, task):
    import onnxruntime as ort
    import torch

    from fpt_deploy.checkpoint import load_checkpoint

    model, task_obj, _ = load_checkpoint(tiny_checkpoints[task])
    spec = task_obj.spec
    rng = np.random.default_rng(0)
    if spec.input_dtype == "uint8":
        raw = rng.integers(0, 256, (6, *spec.input_shape)).astype(np.uint8)
    else:
        raw = rng.integers(0, 2, (6, *spec.input_shape)).astype(spec.input_dtype)
    with torch.no_grad():
        expected = model(torch.from_numpy(raw)).numpy()

    def session(name: str):
        path = triton_repo.out / name / "1" / "model.onnx"
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    hidden, mask, norm_w, norm_b = session(f"{task}_input").run(None, {"input": raw})
    assert norm_w.shape == (6, model.body.num_norms, model.body.hidden_size)
    np.testing.assert_array_equal(norm_w, np.broadcast_to(model.norm_weight.detach().numpy(), norm_w.shape))
    np.testing.assert_array_equal(norm_b, np.broadcast_to(model.norm_bias.detach().numpy(), norm_b.shape))
    feeds = {"hidden": hidden, "attention_mask": mask, "norm_weight": norm_w, "norm_bias": norm_b}
    (last,) = session(triton_repo.backbones[0]).run(None, feeds)
    (logits,) = session(f"{task}_output").run(None, {"last_hidden": last, "attention_mask": mask})
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4


def test_rewriting_replaces_the_whole_repository(deploy_repo, tmp_path):
    out = tmp_path / "models"
    write_triton_repository(TritonConfig(repo=deploy_repo, out=out, tasks=("bit-xor",)))
    (out / "stale").mkdir()
    result = write_triton_repository(TritonConfig(repo=deploy_repo, out=out, tasks=("mnist",)))
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.backbones, "mnist", "mnist_input", "mnist_output"])


def test_bad_settings_and_names_are_clear_errors(deploy_repo, tmp_path):
    with pytest.raises(ConfigError) as err:
        TritonConfig(repo=deploy_repo, max_batch_size=0, max_queue_delay_us=-1, instances=0, instance_kind="GPU")
    assert all(word in str(err.value) for word in ("max batch size", "queue delay", "instances", "instance kind"))
    with pytest.raises(UnknownNameError, match="cifar10"):
        write_triton_repository(TritonConfig(repo=deploy_repo, out=tmp_path / "m", tasks=("cifar10",)))
    with pytest.raises(ArtifactError, match="not a deployment repository"):
        write_triton_repository(TritonConfig(repo=tmp_path / "nothing"))


def test_norm_outputs_need_an_input_head():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])],
    )
    with pytest.raises(ArtifactError, match="outputs"):
        add_norm_outputs(helper.make_model(graph), np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32))


def test_cli_export_format_triton_writes_beside_the_repository(deploy_repo):
    from typer.testing import CliRunner

    from fpt_deploy.cli import app

    result = CliRunner().invoke(app, ["export", "--format", "triton", "--repo", str(deploy_repo)])
    assert result.exit_code == 0, result.output
    assert _configs(deploy_repo / "triton")["mnist"].platform == "ensemble"
