"""A killed export leaves a loadable repository; damaged files give ArtifactError when opened or loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fpt_deploy.export.validate import ort_session

from fpt_deploy.artifacts import open_repository
from fpt_deploy.errors import ArtifactError


def _load_everything(root):
    """Open the repository and verify + load every file it lists, as a server would at start-up."""
    repo = open_repository(root)
    for b in repo.backbones.values():
        for variant in b.files:
            ort_session(b.path(repo.root, variant))
    for name, t in repo.tasks.items():
        w, b = t.load_norms(repo.root)
        assert w.shape == b.shape == (repo.backbone_for(name).num_norms, repo.backbone_for(name).hidden_size)
        for kind in ("input", "output"):
            ort_session(repo.root / t.files[kind])
    return repo


def _kill_when(pattern: str, root, args: list[str], timeout: float = 120.0) -> None:
    """Run ``fpt-deploy export ARGS`` and SIGKILL it as soon as a path matching ``pattern`` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpt_deploy.cli", "export", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not list(root.glob(pattern)):
            if proc.poll() is not None:
                pytest.fail(f"export finished before {pattern} appeared: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern} did not appear within {timeout:.0f}s")
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the export's own process group, started just above
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["backbone", "task"])
def test_killed_export_leaves_the_previous_repository_loadable(
    phase, repo_copy, tiny_checkpoints, tiny_gpt2_checkpoint
):
    before = open_repository(repo_copy).to_manifest()
    if phase == "backbone":  # a task on another body: its backbone is being written when the kill comes
        checkpoint, pattern = tiny_gpt2_checkpoint, "backbones/*/.backbone.onnx.*.tmp"
    else:  # the task's staging folder exists: its heads are being written and validated
        checkpoint, pattern = tiny_checkpoints["bit-xor"], "tasks/.bit-xor.*.stage"
    _kill_when(pattern, repo_copy, ["--checkpoint", str(checkpoint), "--repo", str(repo_copy)])
    repo = _load_everything(repo_copy)
    assert repo.to_manifest() == before
    # ... and the next export completes over the leftovers.
    from fpt_deploy.export import ExportConfig, export_task

    export_task(ExportConfig(checkpoints=[checkpoint], repo=repo_copy))
    repo = _load_everything(repo_copy)
    assert set(repo.tasks) == {"mnist", "bit-xor"}
    assert len(repo.backbones) == (2 if phase == "backbone" else 1)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "bit-flipped"])
@pytest.mark.parametrize("target", ["backbone", "input", "output", "norms"])
def test_damaged_files_raise_artifact_error_when_loaded(repo_copy, target, damage):
    repo = open_repository(repo_copy)
    t = repo.task("mnist")
    if target == "backbone":
        b = repo.backbone_for("mnist")
        damage(repo.root / b.files["fp32"])
        load = lambda: b.path(repo.root)
    elif target == "norms":
        damage(repo.root / t.files["norms"])
        load = lambda: t.load_norms(repo.root)
    else:
        from fpt_deploy.artifacts import verify_file

        damage(repo.root / t.files[target])
        load = lambda: verify_file(repo.root, t.files[target], t.sha256[target])
    with pytest.raises(ArtifactError, match="re-run `fpt-deploy export`"):
        load()


@pytest.mark.parametrize("file", ["manifest.json", "tasks/mnist/task.json"])
def test_damaged_json_raises_artifact_error_at_open(repo_copy, file):
    _truncate(repo_copy / file)
    with pytest.raises(ArtifactError):
        open_repository(repo_copy)


def test_unloadable_graph_is_an_artifact_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ArtifactError, match="not a loadable ONNX graph"):
        ort_session(bad)
