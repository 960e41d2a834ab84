"""`export --format triton --backend tensorrt`: GPU instance groups, ONNX Runtime's TensorRT accelerator on the
backbone with a profile that covers the served shapes, and class names on every logits output. Every
config.pbtxt must parse into Triton's own ModelConfig (tritonclient's model_config_pb2)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the dev extra) for ModelConfig")

from fpt_deploy.export.triton import TritonConfig, write_triton_repository  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from fpt_deploy.errors import ConfigError  # noqa: E402


def _configs(root: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {
        path.parent.name: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        for path in sorted(root.glob("*/config.pbtxt"))
    }


@pytest.fixture(scope="module")
def gpu_export(synthetic_repo_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-gpu") / "models"
    return write_triton_repository(
        TritonConfig(repo=synthetic_repo_module, out=out, backend="tensorrt", max_batch_size=32, max_len=128)
    )


@pytest.fixture(scope="module")
def synthetic_repo_module(tmp_path_factory) -> Path:
    """The torch-free synthetic repository of tests/serving/conftest.py (three tasks, D=8, two norms)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "serving_conftest", Path(__file__).parents[1] / "serving" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_synthetic_repo(tmp_path_factory.mktemp("synthetic"))


def test_every_model_runs_on_gpu_instances(gpu_export):
    configs = _configs(gpu_export.out)
    assert len(configs) == 1 + 3 * 3  # one backbone; per task: ensemble, input head, output head
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        assert config.platform == "onnxruntime_onnx", name
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU], name


def test_backbone_uses_the_tensorrt_accelerator_with_a_profile_over_the_served_shapes(gpu_export):
    (backbone,) = gpu_export.backbones
    config = _configs(gpu_export.out)[backbone]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert params["trt_engine_cache_enable"] == "1"
    # hidden (B, L, D=8), attention_mask (B, L), norms (B, N_norm=2, D): B and L vary, the rest come from the graph
    assert params["trt_profile_min_shapes"] == "hidden:1x1x8,attention_mask:1x1,norm_weight:1x2x8,norm_bias:1x2x8"
    assert params["trt_profile_opt_shapes"] == "hidden:16x32x8,attention_mask:16x32,norm_weight:16x2x8,norm_bias:16x2x8"
    assert params["trt_profile_max_shapes"] == (
        "hidden:32x128x8,attention_mask:32x128,norm_weight:32x2x8,norm_bias:32x2x8"
    )
    heads = [c for n, c in _configs(gpu_export.out).items() if n.endswith(("_input", "_output"))]
    assert all(not c.optimization.execution_accelerators.gpu_execution_accelerator for c in heads)


def test_logits_carry_label_files_so_class_count_returns_names(gpu_export, synthetic_repo_module):
    from fpt_deploy.artifacts import open_repository

    repo = open_repository(synthetic_repo_module)
    configs = _configs(gpu_export.out)
    for task in gpu_export.tasks:
        for model in (task, f"{task}_output"):
            (logits,) = [o for o in configs[model].output if o.name == "logits"]
            assert logits.label_filename == "labels.txt", model
            names = (gpu_export.out / model / logits.label_filename).read_text().splitlines()
            assert names == list(repo.task(task).labels), model


def test_default_backend_keeps_auto_instances_and_no_accelerator(synthetic_repo_module, tmp_path):
    result = write_triton_repository(TritonConfig(repo=synthetic_repo_module, out=tmp_path / "m"))
    configs = _configs(result.out)
    backbone = configs[result.backbones[0]]
    assert backbone.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert not backbone.optimization.execution_accelerators.gpu_execution_accelerator
    assert configs["vec_output"].output[0].label_filename == "labels.txt"  # names on CPU deployments too


def test_bad_backend_is_a_clear_error(synthetic_repo_module):
    with pytest.raises(ConfigError, match="backend must be onnxruntime or tensorrt"):
        TritonConfig(repo=synthetic_repo_module, backend="tensorflow", max_len=0)


def test_cli_export_triton_backend_tensorrt(synthetic_repo_module, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from fpt_deploy.cli import app

    repo = tmp_path / "repo"
    shutil.copytree(synthetic_repo_module, repo)
    result = CliRunner().invoke(app, ["export", "--format", "triton", "--backend", "tensorrt", "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    backbone = next(c for n, c in _configs(repo / "triton").items() if n.startswith("fpt_backbone_"))
    assert backbone.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
