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


def _serve_one_row_each(model, names, raw, max_batch_size=8):
    """Logits of ``raw[i]`` for ``names[i]``, through a batcher whose executor pages rows in."""
    batcher = DynamicBatcher(
        MixedBatchExecutor(model.runtime, page_in=model.page_in), max_batch_size=max_batch_size, max_queue_delay_ms=5
    )
    try:
        futures = [batcher.submit(model.task(n), raw[i : i + 1]) for i, n in enumerate(names)]
        return [f.result(timeout=60) for f in futures]
    finally:
        batcher.close(10)


def test_with_max_resident_tasks_rows_are_paged_in_and_answers_do_not_change(thousand_tasks):
    """1,000 tasks loaded, rows of 16 in memory: tasks beyond them are read back on use, least recent out."""
    rng = np.random.default_rng(3)
    sample = ["mnist", *(f"m{k:04d}" for k in rng.choice(np.arange(1, TASKS), 47, replace=False))]
    names = sample + sample[::-1]  # every task twice: the second time most were evicted in between
    raw = rng.integers(0, 256, (len(names), 28, 28)).astype(np.uint8)
    config = RuntimeConfig(repo=thousand_tasks, threads=1)
    reference = ServingModel(config, tasks=sample)  # every sampled task resident
    paged = ServingModel(config, max_resident_tasks=16)
    try:
        assert len(paged.tasks) == TASKS + 1 and paged.resident_tasks == 16
        assert paged.runtime.num_tasks <= 16  # the norm tables hold 16 rows, not 1,001
        assert paged.heads[paged.tasks["mnist"].heads.key].tables.capacity <= 16
        expected = [r.logits for r in _serve_one_row_each(reference, names, raw)]
        got = _serve_one_row_each(paged, names, raw)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(g.logits, e, atol=1e-5)
        assert paged.resident_tasks == 16
        assert sum(t.resident for t in paged.tasks.values()) == 16
        assert len({t.slot for t in paged.tasks.values() if t.resident}) == 16  # no slot shared
    finally:
        reference.close()
        paged.close()


def test_a_paged_task_serves_the_rows_it_was_loaded_with_and_a_failed_read_fails_only_its_requests(
    thousand_tasks, tmp_path, monkeypatch
):
    root = Path(shutil.copytree(thousand_tasks, tmp_path / "repo"))
    model = ServingModel(RuntimeConfig(repo=root, threads=1), max_resident_tasks=8)
    try:
        cold, broken = "m0900", "m0901"
        raw = np.random.default_rng(4).integers(0, 256, (3, 28, 28)).astype(np.uint8)
        before = ServingModel(RuntimeConfig(repo=root, threads=1), tasks=[cold])
        try:
            expected = _serve_one_row_each(before, [cold], raw)[0].logits
        finally:
            before.close()
        assert not model.tasks[cold].resident
        art = model.repository.tasks[cold]
        for kind in ("heads", "norms"):  # the repository changes: the loaded version keeps serving
            (root / art.files[kind]).unlink()
        np.testing.assert_allclose(_serve_one_row_each(model, [cold], raw)[0].logits, expected, atol=1e-5)
        assert model.tasks[cold].resident

        spill_get = model._spill.get

        def failing_get(name):
            if name == broken:
                raise OSError("disk gone")
            return spill_get(name)

        monkeypatch.setattr(model._spill, "get", failing_get)
        batcher = DynamicBatcher(
            MixedBatchExecutor(model.runtime, page_in=model.page_in), max_batch_size=8, max_queue_delay_ms=50
        )
        try:
            futures = [batcher.submit(model.task(n), raw[i : i + 1]) for i, n in enumerate(["mnist", broken, "m0001"])]
            assert futures[0].result(timeout=30).logits.shape == (1, 10)
            assert futures[2].result(timeout=30).logits.shape == (1, 10)
            with pytest.raises(OSError, match="disk gone"):
                futures[1].result(timeout=30)
        finally:
            batcher.close(10)
        assert not model.tasks[broken].resident and model.resident_tasks <= 8

        model.remove_task(broken)  # a task that holds no rows unloads like any other
        assert broken not in model.tasks
        model.remove_task("mnist")
        assert "mnist" not in model.tasks and model.resident_tasks <= 8
        model.add_task("mnist")  # loaded again while the resident rows are full: read on its next batch
        assert _serve_one_row_each(model, ["mnist"], raw)[0].logits.shape == (1, 10)
        assert model.tasks["mnist"].resident
    finally:
        model.close()


def test_an_executor_that_cannot_page_in_refuses_a_task_without_rows(thousand_tasks):
    """Slot -1 would gather another task's rows: the request fails with what to do instead."""
    model = ServingModel(RuntimeConfig(repo=thousand_tasks, threads=1), max_resident_tasks=8)
    batcher = DynamicBatcher(MixedBatchExecutor(model.runtime), max_batch_size=8, max_queue_delay_ms=50)
    try:
        raw = np.zeros((2, 28, 28), np.uint8)
        warm, cold = "m0001", "m0900"  # loaded in name order: the first 8 hold rows
        assert model.tasks[warm].resident and not model.tasks[cold].resident
        futures = [batcher.submit(model.task(n), raw[i : i + 1]) for i, n in enumerate([warm, cold])]
        assert futures[0].result(timeout=30).logits.shape == (1, 10)
        with pytest.raises(RuntimeError, match=r"rows of m0900 are not in memory; .*page_in=model.page_in"):
            futures[1].result(timeout=30)
    finally:
        batcher.close(10)
        model.close()


def test_max_resident_tasks_below_the_batch_size_is_refused(thousand_tasks):
    from fpt_deploy.serving import ServeConfig

    from fpt_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max resident tasks must be >= max batch size 32"):
        ServeConfig(repo=thousand_tasks, max_resident_tasks=8)
