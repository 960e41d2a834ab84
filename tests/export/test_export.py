"""Export of mnist + bit-xor on tiny-bert: layout, idempotency, parity, mixed batches, graph contract."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fpt_deploy.export import ExportConfig, export_task

from fpt_deploy.artifacts import BACKBONE_INPUTS, BACKBONE_OUTPUT, LOCK, open_repository
from fpt_deploy.errors import ConfigError

MB = 1 << 20


def _pipeline(repo, name):
    """ORT sessions for one task, built only from what the repository says (as a server would)."""
    import onnxruntime as ort

    t = repo.task(name)
    open_ = lambda kind: ort.InferenceSession(str(repo.root / t.files[kind]), providers=["CPUExecutionProvider"])
    return open_("input"), open_("output"), t.load_norms(repo.root)


def _backbone(repo):
    import onnxruntime as ort

    (b,) = repo.backbones.values()
    return ort.InferenceSession(str(b.path(repo.root)), providers=["CPUExecutionProvider"])


def _torch_logits(checkpoint, raw):
    import torch

    from fpt_deploy.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(raw)).numpy()


def _test_inputs(repo, name, rows):
    from fpt_deploy.tasks import get_task

    return get_task(name, **repo.task(name).spec.options).load_data("test").inputs[:rows]


def test_two_tasks_share_exactly_one_backbone_file(exported):
    repo = open_repository(exported.repo)
    files = sorted(p.relative_to(repo.root).as_posix() for p in repo.root.rglob("*.onnx"))
    backbones = [f for f in files if f.startswith("backbones/")]
    assert len(backbones) == 1, backbones
    assert len(repo.backbones) == 1 and set(repo.tasks) == {"mnist", "bit-xor"}
    (fp,) = repo.backbones
    assert {t.fingerprint for t in repo.tasks.values()} == {fp}
    assert sorted(f for f in files if f.startswith("tasks/")) == [
        "tasks/bit-xor/input.onnx",
        "tasks/bit-xor/output.onnx",
        "tasks/mnist/input.onnx",
        "tasks/mnist/output.onnx",
    ]
    leftovers = [p for p in repo.root.rglob(".*") if p.name != LOCK]  # the writers' lock file stays, by design
    assert not leftovers, "no temp files or staging folders are left behind"


def test_reexport_leaves_backbone_and_unchanged_tasks_untouched(exported, repo_copy, tiny_checkpoints, monkeypatch):
    import fpt_deploy.artifacts as artifacts

    locks, writes = [], []
    real_lock, real_save = artifacts.repository_lock, artifacts.Repository.save_manifest
    monkeypatch.setattr(artifacts, "repository_lock", lambda *a, **k: locks.append(1) or real_lock(*a, **k))
    monkeypatch.setattr(artifacts.Repository, "save_manifest", lambda self: writes.append(1) or real_save(self))
    repo = open_repository(repo_copy)
    backbone = next(iter(repo.backbones.values())).path(repo.root)
    before = (backbone.read_bytes(), backbone.stat().st_mtime_ns)
    heads = {p: p.stat().st_mtime_ns for p in (repo.root / "tasks").rglob("*") if p.is_file()}
    checkpoints = [tiny_checkpoints["bit-xor"], tiny_checkpoints["mnist"]]
    result = export_task(ExportConfig(checkpoints=checkpoints, repo=repo_copy, validation_rows=16))  # as exported
    assert (backbone.read_bytes(), backbone.stat().st_mtime_ns) == before
    assert result.backbones_written == []
    assert not any(t.written for t in result.tasks.values())
    assert {p: p.stat().st_mtime_ns for p in heads} == heads
    assert open_repository(repo_copy).to_manifest() == repo.to_manifest()
    # Two repository transactions (shared files, then tasks); nothing changed, so the manifest is not rewritten.
    assert (len(locks), len(writes)) == (2, 0)


@pytest.mark.parametrize("name", ["mnist", "bit-xor"])
def test_onnx_runtime_matches_pytorch_on_held_out_inputs(exported, tiny_checkpoints, name):
    repo = open_repository(exported.repo)
    input_head, output_head, (w, b) = _pipeline(repo, name)
    raw = _test_inputs(repo, name, 64)
    hidden, mask = input_head.run(None, {"input": raw})
    n = len(raw)
    feed = {
        "hidden": hidden,
        "attention_mask": mask,
        "norm_weight": np.repeat(w[None], n, 0),
        "norm_bias": np.repeat(b[None], n, 0),
    }
    last = _backbone(repo).run(None, feed)[0]
    logits = output_head.run(None, {"last_hidden": last, "attention_mask": mask})[0]
    diff = np.abs(logits - _torch_logits(tiny_checkpoints[name], raw)).max()
    assert diff <= 1e-4
    assert exported.tasks[name].max_abs_diff <= 1e-4


def test_64_row_mixed_batch_in_one_backbone_call_equals_each_task_alone(exported, tiny_checkpoints):
    repo = open_repository(exported.repo)
    names = ["mnist", "bit-xor"]
    owner = np.array([i % 3 == 0 for i in range(64)], dtype=int)  # uneven interleaving: 22 bit-xor rows
    parts, expected = {}, {}
    for k, name in enumerate(names):
        input_head, output_head, norms = _pipeline(repo, name)
        raw = _test_inputs(repo, name, 64)[: (owner == k).sum()]
        parts[name] = (*input_head.run(None, {"input": raw}), norms, output_head)
        expected[name] = _torch_logits(tiny_checkpoints[name], raw)
    length = max(p[0].shape[1] for p in parts.values())
    d = parts["mnist"][0].shape[2]
    n_norm = parts["mnist"][2][0].shape[0]
    hidden, mask = np.zeros((64, length, d), np.float32), np.zeros((64, length), np.int64)
    weight, bias = np.zeros((64, n_norm, d), np.float32), np.zeros((64, n_norm, d), np.float32)
    for k, name in enumerate(names):
        h, m, (w, b), _ = parts[name]
        rows = np.flatnonzero(owner == k)
        hidden[rows, : h.shape[1]], mask[rows, : m.shape[1]], weight[rows], bias[rows] = h, m, w, b
    last = _backbone(repo).run(
        None, {"hidden": hidden, "attention_mask": mask, "norm_weight": weight, "norm_bias": bias}
    )[0]  # ONE call for both tasks
    for k, name in enumerate(names):
        h, m, _, output_head = parts[name]
        rows = np.flatnonzero(owner == k)
        got = output_head.run(
            None, {"last_hidden": np.ascontiguousarray(last[rows, : h.shape[1]]), "attention_mask": m}
        )[0]
        assert np.abs(got - expected[name]).max() <= 1e-4, name
    (diff,) = exported.mixed_batch_diff.values()
    assert diff <= 1e-4


def test_backbone_graph_follows_the_contract(exported):
    repo = open_repository(exported.repo)
    model = onnx.load(str(next(iter(repo.backbones.values())).path(repo.root)))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # Only standard ONNX ops (what TensorRT's parser reads), never an ORT contrib op.
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    assert tuple(inputs) == BACKBONE_INPUTS, "norm tables are graph inputs, never folded constants"
    dims = {name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for name, i in inputs.items()}
    batch, length = dims["hidden"][:2]
    assert isinstance(batch, str) and isinstance(length, str)
    assert dims["attention_mask"] == [batch, length]
    assert dims["norm_weight"][0] == batch and dims["norm_bias"][0] == batch
    assert inputs["attention_mask"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in model.graph.output] == [BACKBONE_OUTPUT]
    # Shapes never seen at export time run too.
    backbone = _backbone(repo)
    for b, n in ((1, 1), (7, 130)):
        d, n_norm = dims["hidden"][2], dims["norm_weight"][1]
        out = backbone.run(
            None,
            {
                "hidden": np.ones((b, n, d), np.float32),
                "attention_mask": np.ones((b, n), np.int64),
                "norm_weight": np.ones((b, n_norm, d), np.float32),
                "norm_bias": np.zeros((b, n_norm, d), np.float32),
            },
        )[0]
        assert out.shape == (b, n, d) and np.isfinite(out).all()


def test_heads_and_norms_are_small(exported):
    for name, t in exported.tasks.items():
        files = [exported.repo / f for f in t.artifact.files.values()]
        assert sum(p.stat().st_size for p in files) == t.bytes <= 2 * MB, name


@pytest.mark.slow
def test_heads_and_norms_are_small_on_minilm(minilm_checkpoint, tmp_path):
    result = export_task(ExportConfig(checkpoints=[minilm_checkpoint], repo=tmp_path / "deploy", validation_rows=32))
    (t,) = result.tasks.values()
    assert t.bytes <= 2 * MB
    assert t.max_abs_diff <= 1e-4
    (files,) = result.backbones.values()
    assert files["fp32"].stat().st_size > 20 * MB  # the body is the big shared part


def test_export_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        ExportConfig(tasks=["mnist", "mnist"], opset=13, quantize="int4", atol=0)
    message = str(e.value)
    for part in ("named twice", "opset", "quantize", "atol"):
        assert part in message
