"""The benchmark suite's quick path end to end on tiny-bert: files and keys, never timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.config import SECTIONS, SuiteConfig  # noqa: E402
from bench.many_tasks import traffic  # noqa: E402
from bench.suite import run_suite  # noqa: E402


@pytest.fixture(scope="module")
def suite(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = SuiteConfig.quick(
        checkpoint=tiny_checkpoints["mnist"],
        out=out / "results",
        markdown=out / "BENCHMARKS.md",
        concurrency=(1, 4),
        level_seconds=0.5,
        level_requests=40,
        raw_batches=(1, 4),
        raw_seconds=0.05,
        raw_rounds=1,
        gemm_size=128,
        gemm_seconds=0.05,
        train_batch=8,
        train_timed_steps=1,
        max_batch_size=4,
        task_counts=(1, 3, 6),
        max_resident_tasks=4,  # the paged fp32 server runs at N=6 only
        tasks_level_seconds=0.3,
        tasks_requests_cycled=16,
        per_task_max_tasks=3,
        skip=(),
        budget_s=3600.0,  # every section must run, however busy the machine
    )
    return out, run_suite(config)


def test_every_section_ran_and_json_is_written(suite):
    out, results = suite
    assert results["errors"] == {}
    saved = json.loads((out / "results" / "suite_quick.json").read_text())
    for key in ("machine", "checkpoint", "repository", "tasks", "int8_accuracy", "summary", *SECTIONS):
        assert key in saved, key
    assert saved["repository"]["variants"] == ["fp32", "int8"]
    assert len(saved["tasks"]) == 2  # a mixed load: the task and a clone under another name
    assert set(saved["machine"]["flags"]) >= {"avx512f", "avx512_vnni", "avx512_bf16"}
    assert {"numpy", "onnxruntime", "torch"} <= set(saved["machine"]["versions"])


def test_load_has_every_contender_and_level(suite):
    _, results = suite
    levels = results["load"]["levels"]
    assert set(levels) == {"fpt-deploy fp32", "fpt-deploy int8", "torch per task", "ort per task"}
    for contender in levels.values():
        assert [lv["concurrency"] for lv in contender] == [1, 4]
        assert all(lv["errors"] == 0 and lv["requests"] > 0 for lv in contender)
    rows = results["summary"]["levels"]
    fpt = [r for r in rows if r["contender"].startswith("fpt-deploy")]
    assert fpt and all(r["over_torch_per_task"] and r["over_raw_backbone"] for r in fpt)


def test_training_rows(suite):
    _, results = suite
    steps = results["training"]["steps"]
    precisions = ("fp32", "bf16 autocast") if results["machine"]["native_bf16"] else ("fp32",)
    assert {(s["mode"], s["precision"]) for s in steps} == {
        (m, p) for m in ("fpt", "full fine-tuning") for p in precisions
    }
    assert bool(results["training"]["skipped"]) != results["machine"]["native_bf16"]  # emulated bf16: skipped
    fp32 = {s["mode"]: s for s in steps if s["precision"] == "fp32"}
    fpt, full = fp32["fpt"], fp32["full fine-tuning"]
    assert fpt["trainable_params"] < full["trainable_params"]


def test_markdown_and_plots(suite):
    out, results = suite
    text = (out / "BENCHMARKS.md").read_text()
    for heading in (
        "## Machine",
        "## Goals (issue 5)",
        "## Mixed-task serving throughput",
        "## Raw backbone",
        "## Training step speed",
        "## Goals (issue 14: many tasks)",
        "## N tasks on one server",
        "## Plots",
    ):
        assert heading in text, heading
    assert text.count("<!-- machine: ") == 1  # this machine's section, once
    plots = results["files"]["plots"]
    assert len(plots) == 6
    for p in plots:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_many_tasks_levels_for_every_contender(suite):
    _, results = suite
    many = results["many_tasks"]
    fpt = {"fpt-deploy fp32", "fpt-deploy int8"}
    assert set(many["contenders"]) == fpt | {"fpt-deploy fp32 paged", "torch per task", "ort per task"}
    for name, points in many["contenders"].items():
        want = [6] if name == "fpt-deploy fp32 paged" else [1, 3, 6] if name in fpt else [1, 3]
        assert [p["tasks"] for p in points] == want, name
        for p in points:
            assert p["startup_s"] > 0 and p["rss_mb"] > 0
            assert {(lv["traffic"], lv["concurrency"]) for lv in p["levels"]} == {
                (t, c) for t in ("uniform", "zipf") for c in (1, 4)
            }
            assert all(lv["errors"] == 0 and lv["requests"] > 0 for lv in p["levels"])
    assert many["stopped"]["ort per task"]["at_tasks"] == 6  # per_task_max_tasks=3: stopped, with the reason
    goals = {g["goal"]: g for g in results["summary"]["many_task_goals"]}
    assert "c=1: fp32 / raw backbone at batch 1" in goals
    c1 = next(lv for lv in many["contenders"]["fpt-deploy fp32"][0]["levels"] if lv["concurrency"] == 1)
    assert c1["server_ms"]["backbone"] > 0 and c1["server_ms"]["queue"] >= 0  # read from the server's /metrics
    pair = many["interleaved"]["servers"]  # N=1 and the middle N, measured again, levels alternated
    assert set(pair) == {1, 6} and all(len(p["rows_per_s"]) == 3 and p["median"] > 0 for p in pair.values())
    assert "alternated rounds" in goals["6 tasks, uniform, c=4: fp32 / its own 1-task throughput"]["note"]
    memory = goals["6 tasks loaded: RSS / 1 task"]  # measured on the paged server, every-resident beside it
    assert memory["value"] > 0 and "rows of 4 tasks in memory" in memory["note"]


def test_zipf_traffic_has_hot_tasks_and_a_tail():
    import numpy as np

    names = [f"t{k}" for k in range(100)]
    zipf = traffic(names, "zipf", 20_000, np.random.default_rng(0))
    uniform = traffic(names, "uniform", 20_000, np.random.default_rng(0))
    assert zipf.count("t0") > 10 * zipf.count("t99") > 0  # 1/k^1.1: rank 1 is ~158x rank 100
    assert 100 < uniform.count("t0") < 300 and 100 < uniform.count("t99") < 300


def test_benchmarks_md_keeps_one_section_per_machine(tmp_path):
    from bench.report import write_markdown

    def results(cpu: str, started: str) -> dict:
        machine = {"cpu": cpu, "cpu_described": f"{cpu} (AVX-512)", "cores_physical": 2}
        return {"machine": machine, "started": started, "summary": {"levels": [], "goals": []}}

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Machine\n\n| what | value |\n| --- | --- |\n| CPU | Old EPYC |\n")
    write_markdown(results("Xeon", "day 1"), path)
    write_markdown(results("EPYC", "day 1"), path)
    write_markdown(results("Xeon", "day 2"), path)  # replaces the Xeon section only
    text = path.read_text()
    assert text.count("<!-- machine: ") == 3
    assert "day 2" in text and text.count("Xeon (AVX-512), 2 cores -->") == 1
    assert "## Old EPYC (an earlier version of the suite)" in text  # the file from before, kept


def test_benchmarks_md_keeps_the_notes_written_by_hand(tmp_path):
    from bench.report import NOTES_START, write_markdown

    results = {
        "machine": {"cpu": "Xeon", "cores_physical": 2},
        "started": "day 1",
        "summary": {"levels": [], "goals": []},
    }
    path = tmp_path / "BENCHMARKS.md"
    write_markdown(results, path)
    notes = f"{NOTES_START} -->\n## Measured by hand\n\n- int8: alpha 0.75, 7 predictions changed\n"
    path.write_text(path.read_text() + "\n" + notes)
    write_markdown({**results, "started": "day 2"}, path)  # a re-run on the same machine
    text = path.read_text()
    assert "day 2" in text and "day 1" not in text
    assert text.endswith(notes) and text.count(NOTES_START) == 1


def test_report_only_rederives_the_report_from_a_saved_run(suite, tmp_path):
    import shutil

    from bench.__main__ import main

    out, results = suite
    saved = Path(shutil.copy(out / "results" / "suite_quick.json", tmp_path / "suite.json"))
    md = tmp_path / "BENCHMARKS.md"
    assert main(["--report-only", str(saved), "--markdown", str(md), "--out", str(tmp_path), "--no-plots"]) == 0
    text = md.read_text()
    assert "### Goals (issue 14: many tasks)" in text and results["machine"]["cpu"] in text
    assert json.loads(saved.read_text())["summary"]["goals"] == results["summary"]["goals"]


@pytest.mark.parametrize("content", [None, "[1]", "{not json"])
def test_report_only_refuses_what_is_not_a_results_file(tmp_path, content, capsys):
    from bench.__main__ import main

    path = tmp_path / "suite.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        main(["--report-only", str(path)])
    assert stop.value.code == 2
    assert "--report-only" in capsys.readouterr().err


def test_an_empty_markdown_option_writes_no_table(suite, tmp_path, monkeypatch):
    import shutil

    from bench.__main__ import main

    out, _ = suite
    saved = Path(shutil.copy(out / "results" / "suite_quick.json", tmp_path / "suite.json"))
    monkeypatch.chdir(tmp_path)
    assert main(["--report-only", str(saved), "--markdown", "", "--out", str(tmp_path), "--no-plots"]) == 0
    assert not list(tmp_path.glob("*.md"))
