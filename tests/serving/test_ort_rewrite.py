"""The ORT runtime's own rewrite of the portable backbone: applied at load, same outputs, cached on disk."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fpt_deploy.export.graphs import write_backbone_graph
from fpt_deploy.serving.runtimes import cache, create_runtime
from fpt_deploy.serving.runtimes import ort_rewrite as rewrite
from fpt_deploy.serving.runtimes.cache import CACHE_DIR
from fpt_deploy.serving.runtimes.ort_rewrite import ort_graph, parity_feeds, residual_sums, rewrite_for_ort

import fpt_deploy.atomic as atomic
from fpt_deploy.backbones import load_backbone


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory) -> dict:
    out = {}
    for name in ("tiny-bert", "tiny-gpt2"):
        body = load_backbone(name)
        path = tmp_path_factory.mktemp(name) / "backbone.onnx"
        write_backbone_graph(body, path, 18)
        out[name] = (body, path)
    return out


@pytest.fixture
def backbone(backbone_files, tmp_path) -> Path:
    """A private copy of the tiny-bert portable backbone in its own folder (its cache goes beside it)."""
    path = tmp_path / "repo" / "backbone.onnx"
    path.parent.mkdir()
    path.write_bytes(backbone_files["tiny-bert"][1].read_bytes())
    return path


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "fpt-deploy"


def _run(path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _batch(body, rows=2, length=3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((rows, length, body.hidden_size), dtype=np.float32)
    return hidden, np.ones((rows, length), np.int64), np.zeros(rows, np.int64)


def _count_rewrites(monkeypatch) -> list:
    calls = []
    real = rewrite.rewrite_for_ort

    def counted(source, target):
        calls.append(source)
        return real(source, target)

    monkeypatch.setattr(rewrite, "rewrite_for_ort", counted)
    return calls


@pytest.mark.parametrize(
    ("name", "in_child"),
    [("tiny-bert", False), ("tiny-gpt2", False), ("tiny-bert", True)],  # the child runs the same code
    ids=["tiny-bert", "tiny-gpt2", "tiny-bert-child-process"],
)
def test_rewritten_backbone_uses_fused_ops_and_matches_the_portable_graph(
    name, in_child, backbone_files, tmp_path, monkeypatch
):
    body, path = backbone_files[name]
    if in_child:  # the path real backbones take
        monkeypatch.setattr(rewrite, "IN_PROCESS_BYTES", 0)
    before = path.read_bytes()
    counts = rewrite_for_ort(path, tmp_path / "rewritten.onnx")
    layers = 2  # both tiny bodies
    assert counts["packed_attention"] == layers and counts["residual_sum"] == 2 * layers
    assert path.read_bytes() == before  # the portable file is never rewritten
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rewritten.onnx")).graph.node]
    assert ops.count("Attention") == layers and ops.count("Sum") == 2 * layers  # packed attention; residual Sums
    assert not {"MultiHeadAttention", "Split", "Softmax"} & set(ops)  # q, k, v projection and softmax folded in
    feeds = parity_feeds(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), rows=4, length=9)
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(_run(tmp_path / "rewritten.onnx", feeds) - _run(path, feeds))[real].max() < 1e-5


def test_residual_sums_keep_ort_away_from_skip_layer_normalization(backbone, tmp_path):
    """The trick's point: ORT's optimizer fuses Add + LayerNormalization, never Sum + LayerNormalization."""
    model = onnx.load(str(backbone))
    n = residual_sums(model)
    assert n == 4 and residual_sums(model) == 0  # idempotent

    def optimized_ops(model_bytes: bytes) -> set[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    assert "SkipLayerNormalization" in optimized_ops(backbone.read_bytes())
    assert "SkipLayerNormalization" not in optimized_ops(model.SerializeToString())
    feeds = parity_feeds(ort.InferenceSession(str(backbone), providers=["CPUExecutionProvider"]))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, _run(backbone, feeds), rtol=1e-5, atol=1e-5)


def test_second_load_reuses_the_cached_copy_without_rewriting(backbone, monkeypatch):
    calls = _count_rewrites(monkeypatch)
    with ort_graph(backbone) as first:
        assert Path(first).parent == backbone.parent / CACHE_DIR
        assert "Attention" in {n.op_type for n in onnx.load(first).graph.node}
    stamp = Path(first).stat().st_mtime_ns
    with ort_graph(backbone) as second:
        ort.InferenceSession(second, providers=["CPUExecutionProvider"])
    assert second == first and Path(second).stat().st_mtime_ns == stamp
    assert len(calls) == 1  # built once, then read from disk
    record = json.loads(Path(first).with_suffix(".json").read_text())
    assert record["outcome"] == "rewritten" and record["changes"]["packed_attention"] == 2


def test_a_corrupt_or_outdated_cache_is_rebuilt(backbone, monkeypatch, caplog):
    calls = _count_rewrites(monkeypatch)
    with ort_graph(backbone) as graph:
        good = Path(graph).read_bytes()
    Path(graph).write_bytes(good[: len(good) // 2])  # truncated behind our back
    with caplog.at_level(logging.WARNING, logger=cache.__name__), ort_graph(backbone) as rebuilt:
        assert Path(rebuilt).read_bytes() == good
    assert len(calls) == 2 and "corrupt" in caplog.text
    monkeypatch.setattr(rewrite, "REWRITE_VERSION", rewrite.REWRITE_VERSION + 1)  # a newer rewrite
    with ort_graph(backbone) as newer:
        assert newer != rebuilt
    assert len(calls) == 3
    assert sorted(p.name for p in (backbone.parent / CACHE_DIR).iterdir()) == sorted(
        [Path(newer).name, Path(newer).with_suffix(".json").name]
    ), "the outdated copy is swept"


def test_a_changed_source_file_gets_its_own_copy(backbone, backbone_files, monkeypatch):
    calls = _count_rewrites(monkeypatch)
    with ort_graph(backbone) as bert:
        pass
    backbone.write_bytes(backbone_files["tiny-gpt2"][1].read_bytes())  # same name, other content
    with ort_graph(backbone) as gpt2:
        feeds = parity_feeds(ort.InferenceSession(str(backbone), providers=["CPUExecutionProvider"]))
        real = feeds["attention_mask"].astype(bool)
        assert np.abs(_run(gpt2, feeds) - _run(backbone, feeds))[real].max() < 1e-5
    assert gpt2 != bert and len(calls) == 2


def _deny_writes_under(folder: Path, monkeypatch) -> None:
    """Make ``folder`` unwritable: chmod, and (for root, whom chmod does not stop) refuse temp files there."""
    folder.chmod(0o555)
    real = atomic.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    if os.geteuid() != 0:
        assert not os.access(folder, os.W_OK)


def test_a_read_only_repository_caches_in_the_user_cache_folder(backbone, user_cache, monkeypatch, caplog):
    calls = _count_rewrites(monkeypatch)
    _deny_writes_under(backbone.parent, monkeypatch)
    try:
        with caplog.at_level(logging.WARNING, logger=cache.__name__), ort_graph(backbone) as graph:
            assert Path(graph).parent == user_cache / "rewrites"
        assert "cannot write" in caplog.text
        with ort_graph(backbone) as again:
            assert again == graph
        assert len(calls) == 1 and not list((backbone.parent / CACHE_DIR).glob("*"))
    finally:
        backbone.parent.chmod(0o755)


def test_with_no_writable_cache_a_temporary_copy_lives_for_the_load(backbone, user_cache, tmp_path, monkeypatch):
    user_cache.mkdir(parents=True)
    _deny_writes_under(backbone.parent, monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(backbone.parent))  # the user cache is read-only too
    try:
        with ort_graph(backbone) as graph:
            assert Path(graph).is_file() and not Path(graph).is_relative_to(backbone.parent)
            ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        assert not Path(graph).exists()
    finally:
        backbone.parent.chmod(0o755)


def test_a_rewrite_that_disagrees_is_refused_and_the_refusal_remembered(backbone, monkeypatch, caplog):
    calls = _count_rewrites(monkeypatch)

    def wrong_sums(model):  # a rewrite bug that changes the arithmetic: the residual becomes a difference
        n = residual_sums(model)
        for node in model.graph.node:
            if node.op_type == "Sum":
                node.op_type = "Sub"
        return n

    monkeypatch.setattr(rewrite, "residual_sums", wrong_sums)
    with caplog.at_level(logging.WARNING, logger=cache.__name__), ort_graph(backbone) as graph:
        assert graph == str(backbone)
    assert "refused" in caplog.text and "differs" in caplog.text
    with ort_graph(backbone) as again:
        assert again == str(backbone)
    assert len(calls) == 1  # deterministic: not retried on every start
    (record,) = (backbone.parent / CACHE_DIR).glob("*.json")
    assert json.loads(record.read_text())["outcome"] == "refused"
    assert not list((backbone.parent / CACHE_DIR).glob("*.onnx"))


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "child-process"])
def test_a_failing_rewrite_runs_the_plain_graph_and_retries_next_start(
    in_child, backbone, backbone_files, monkeypatch, caplog
):
    if in_child:  # the child cannot be monkeypatched: make it fail to start
        monkeypatch.setattr(rewrite, "IN_PROCESS_BYTES", 0)
        monkeypatch.setattr(rewrite.sys, "executable", "/nonexistent/python")
        expected = "nonexistent"
    else:
        import onnxscript.rewriter.ort_fusions as fusions

        def broken(model):
            raise RuntimeError("pattern matcher exploded")

        monkeypatch.setattr(fusions, "optimize_for_ort", broken)
        expected = "pattern matcher exploded"
    with caplog.at_level(logging.WARNING, logger=cache.__name__), ort_graph(backbone) as graph:
        assert graph == str(backbone)
    assert expected in caplog.text and "plain graph" in caplog.text
    assert not list((backbone.parent / CACHE_DIR).glob("*"))  # nothing remembered: the next start tries again
    body = backbone_files["tiny-bert"][0]
    weight = np.ones((1, body.num_norms, body.hidden_size), np.float32)
    runtime = create_runtime("ort", backbone, weight, 0 * weight)  # the server still starts, on the plain graph
    ops = {n.op_type for n in onnx.load(str(backbone)).graph.node}
    assert "Attention" not in ops and runtime.run_backbone(*_batch(body)).shape == (2, 3, body.hidden_size)


def test_the_child_process_reports_failures_and_nothing_to_rewrite(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    assert rewrite.main([str(bad), str(tmp_path / "out.onnx")]) == 1
    assert capsys.readouterr().err.strip()  # the reason, for the parent's warning
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        )
    )
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert rewrite.main([str(tmp_path / "plain.onnx"), str(tmp_path / "out.onnx")]) == 3
    assert not (tmp_path / "out.onnx").exists()


def test_the_int8_variant_is_rewritten_too_and_keeps_its_integer_kernels(backbone, tmp_path):
    """The int8 file is as portable as the float one; the residual Sums that keep SkipLayerNormalization
    away (where it cost the most time) come from the ORT runtime's rewrite."""
    from fpt_deploy.export.quantize import quantize_backbone_int8

    int8 = backbone.with_name("backbone.int8.onnx")
    quantize_backbone_int8(backbone, int8)
    with ort_graph(int8) as graph:
        assert graph != str(int8)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "DynamicQuantizeMatMul" in ops and "SkipLayerNormalization" not in ops, ops


def test_parity_feeds_fit_any_graph_not_only_a_backbone():
    """The benchmarks' whole-task graphs (raw uint8 images in) go through the same rewrite and check."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT), helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, ["batch", 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 28, 28])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = parity_feeds(session, rows=3)
    assert feeds["input"].dtype == np.uint8 and feeds["input"].shape == (3, 28, 28)
    assert session.run(None, feeds)[0].shape == (3, 28, 28)


def test_only_temp_files_whose_writer_is_gone_are_removed(tmp_path):
    """A live writer's temp file (this process, or a fresh one of another host) stays; a dead one's goes."""
    import subprocess
    import sys
    import time

    host = cache._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".backbone.onnx.ort-1.onnx.a.pid{os.getpid()}@{host}.tmp": True,  # this process: a live writer
        f".backbone.onnx.ort-1.onnx.b.pid{dead.pid}@{host}.tmp": False,  # exited
        f".backbone.onnx.ort-1.onnx.c.pid{dead.pid}@other-host.tmp": True,  # another host's, fresh
        ".backbone.onnx.ort-1.json.d.tmp": True,  # unnamed (a record's), fresh
        ".backbone.onnx.ort-1.json.e.tmp": False,  # unnamed, untouched for over STALE_TEMP_S
        "backbone.onnx.ort-1.onnx": True,  # not a temp file
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - cache.STALE_TEMP_S - 60
    os.utime(tmp_path / ".backbone.onnx.ort-1.json.e.tmp", (old, old))
    assert cache.remove_stale_temps(tmp_path) == 2
    assert {p.name for p in tmp_path.iterdir()} == {name for name, kept in names.items() if kept}


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # exited, not yet reaped by init
    except psutil.NoSuchProcess:
        return False


def test_the_rewrite_child_stops_and_removes_its_copy_when_its_parent_dies(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "copy.tmp"
    parent = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fpt_deploy.serving.runtimes import ort_rewrite\n"
        "ort_rewrite.PARENT_CHECK_S = 0.05\n"
        "ort_rewrite._exit_with_parent(Path(sys.argv[1]))\n"
        "Path(sys.argv[1]).write_bytes(b'half a copy')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent, child, str(target)], stdout=subprocess.PIPE, text=True)
    child_pid = int(proc.stdout.readline())
    try:
        for _ in range(3000):  # the child is running and has written (at most 30 s)
            if target.exists():
                break
            time.sleep(0.01)
        assert target.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for _ in range(1000):  # the child notices within PARENT_CHECK_S (at most 10 s)
            if not _running(child_pid):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the rewrite child kept running after its parent was killed")
        assert not target.exists()
    finally:
        for pid in (proc.pid, child_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
