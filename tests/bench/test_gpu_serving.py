"""The GPU serving bench's smoke path on the CPU (tiny sizes, the exported tiny repository): keys, never timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("torch", reason="the torch runtime needs torch")

from bench.gpu_serving import GOALS, ServingBenchConfig, markdown, run_serving_bench  # noqa: E402


def test_smoke_runs_every_contender_and_renders_the_goals(exported_repo, tmp_path):
    cfg = ServingBenchConfig.smoke(
        repo=exported_repo, tasks=(1, 3), concurrency=(1, 4), seconds=0.1, per_task_max=3, raw_batches=(1, 4),
        max_batch_size=4, scratch=tmp_path,
    )  # fmt: skip
    results = run_serving_bench(cfg)
    assert set(results["shared"]) == {1, 3} and set(results["per_task"]) == {1, 3}
    for point in (*results["shared"].values(), *results["per_task"].values()):
        assert set(point["levels"]) == {"uniform c=1", "uniform c=4", "zipf c=1", "zipf c=4"}
        levels = point["levels"].values()
        assert all(level["requests"] > 0 and "errors" not in level for level in levels), point["levels"]
    parity = results["torch_vs_ort"]
    assert parity["labels_equal"] and parity["within_guard"]
    assert set(results["goals"]) == {*GOALS, "torch_vs_ort"}
    text = markdown(results)
    assert text.startswith("## Many tasks on a GPU") and "| per-task | 3 |" in text
