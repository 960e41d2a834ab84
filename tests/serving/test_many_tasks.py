"""A thousand tiny-bert tasks in one ServingModel: rows in shared tables, answers equal to ``predict``'s."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fpt_deploy.serving import DynamicBatcher, MixedBatchExecutor, PredictConfig, RuntimeConfig, ServingModel, predict

from fpt_deploy.artifacts import open_repository

TASKS = 1000


@pytest.fixture(scope="module")
def thousand_tasks(exported_repo, tmp_path_factory) -> Path:
    """The exported mnist task plus 999 of its head shape with random weights, written by the exporter's
    ``write_task_from_rows`` (no per-task graphs: rows only, as a repository of many tasks holds them)."""
    from fpt_deploy.export.heads import write_task_from_rows

    root = Path(shutil.copytree(exported_repo, tmp_path_factory.mktemp("many") / "repo"))
    repo = open_repository(root)
    like = repo.tasks["mnist"]
    rows, norms = like.load_head_rows(root), like.load_norms(root)
    rng = np.random.default_rng(0)
    for k in range(1, TASKS):
        noisy = {n: r + rng.standard_normal(r.shape, dtype=np.float32) * 0.5 for n, r in rows.items()}
        write_task_from_rows(repo, like, f"m{k:04d}", noisy, tuple(t * (1 + 0.2 * rng.random()) for t in norms))
    repo.save_manifest()
    return root


def test_thousand_tasks_share_two_head_sessions_and_answer_like_predict(thousand_tasks, tmp_path):
    model = ServingModel(RuntimeConfig(repo=thousand_tasks, threads=1))
    try:
        mnist_shape = model.tasks["mnist"].heads
        assert len([t for t in model.tasks.values() if t.heads is mnist_shape]) == TASKS
        assert len(model.heads) == 2  # mnist's shape (1,000 tasks) and bit-xor's: two sessions each
        assert len({t.slot for t in model.tasks.values() if t.heads is mnist_shape}) == TASKS
        assert model.runtime.num_tasks >= TASKS + 1

        rng = np.random.default_rng(1)
        sample = ["mnist", "m0001", "m0500", "m0999"]
        raw = rng.integers(0, 256, (len(sample) * 3, 28, 28)).astype(np.uint8)
        batcher = DynamicBatcher(MixedBatchExecutor(model.runtime), max_batch_size=32, max_queue_delay_ms=50)
        try:  # one mixed batch: every sampled task's rows in one input-head, backbone and output-head call
            futures = {n: batcher.submit(model.task(n), raw[3 * i : 3 * i + 3]) for i, n in enumerate(sample)}
            served = {n: f.result(timeout=30).logits for n, f in futures.items()}
        finally:
            batcher.close(10)
    finally:
        model.close()
    answers = set()
    for i, name in enumerate(sample):
        np.save(tmp_path / "x.npy", raw[3 * i : 3 * i + 3])
        alone = predict(PredictConfig(repo=thousand_tasks, task=name, input=tmp_path / "x.npy", threads=1))
        np.testing.assert_allclose(served[name], alone.logits, atol=1e-4)
        answers.add(alone.logits.tobytes())
    assert len(answers) == len(sample)  # the tasks really differ: a wrong row would be caught


def test_a_format_1_repository_is_served_with_each_tasks_own_heads(synthetic_repo, make_inputs, tmp_path):
    """A repository the previous version wrote (manifest and task files /1, no shared heads) still serves."""
    import json

    root = Path(shutil.copytree(synthetic_repo, tmp_path / "old"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format"] = "fpt-deploy-repository/1"
    manifest.pop("heads", None)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for task_file in root.glob("tasks/*/task.json"):
        data = json.loads(task_file.read_text())
        data["format"] = "fpt-deploy-task/1"
        data.pop("heads", None)
        task_file.write_text(json.dumps(data))
    old, new = (ServingModel(RuntimeConfig(repo=r, threads=1)) for r in (root, synthetic_repo))
    try:
        assert all(not t.heads.shared for t in old.tasks.values())  # two sessions each, as before
        raw = make_inputs("tok", 4, np.random.default_rng(2))
        logits = []
        for model in (old, new):
            task = model.task("tok")
            hidden, mask = task.run_input_head(raw)
            last = model.runtime.run_backbone(hidden, mask, np.full(len(raw), task.index, np.int64))
            logits.append(task.run_output_head(last, mask))
        np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)
    finally:
        old.close()
        new.close()
