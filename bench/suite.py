"""The benchmark suite's runner: every section measured in ONE run, on the same tasks and inputs.

    .venv/bin/python -m bench [--quick] [--repo DIR] [--checkpoint DIR] [--out bench/results]

Sections (``bench.config.SECTIONS``), one module each, in the order they run:

- ``gemm`` (``bench.gemm``): matrix-product GFLOP/s with torch on this CPU: the machine's limit.
- ``backbone`` (``bench.backbone``): the shared body alone, ORT fp32/int8 and PyTorch eager, per batch.
- ``many_tasks`` (``bench.many_tasks``): N = 1, 10, 100, 1,000 tasks on one server, uniform and Zipf
  traffic: rows/s, p50/p99, start-up time and RSS per contender and N.
- ``load`` (``bench.load``): the fpt-deploy server (fp32, int8) and the per-task baselines under the
  same closed-loop load, concurrency 1, 8, 32.
- ``training`` (``bench.training``): optimizer steps/s of the FPT step vs full fine-tuning.

What they share is built first (``bench.prepare``); ``bench.report`` turns the results into goals,
plots and the BENCHMARKS.md table. The CPU's features are recorded (``fpt_deploy.cpu``); contenders
that would be emulated (bf16 without avx512_bf16 or amx_bf16) are skipped with the reason. The whole
suite keeps to ``budget_s``: ``many_tasks`` stops ``reserve_s`` before it for the sections after it,
and a level or section past the budget is skipped and reported as such.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.backbone import bench_backbone
from bench.config import SECTIONS, SuiteConfig
from bench.gemm import bench_gemm
from bench.load import bench_load
from bench.many_tasks import bench_tasks
from bench.prepare import int8_accuracy, machine_facts, prepare
from bench.report import summarize, write_markdown, write_plots
from bench.training import bench_training

log = logging.getLogger("bench.suite")


def run_suite(cfg: SuiteConfig) -> dict:
    """Run every section not skipped; write JSON, plots and markdown; return the results.

    A failing section is recorded (``errors``) and the others still run.
    """
    started = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "suite": "fpt-deploy bench",
        "quick": cfg.quick_mode,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine_facts(),
        "errors": {},
        "notes": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="fpt-bench-suite-"))
    try:
        prep = prepare(cfg, scratch)
        results["notes"] += prep.notes
        results["checkpoint"] = prep.checkpoint_info
        results["repository"] = {"path": str(prep.repo), "task": prep.task, "variants": prep.variants}
        results["tasks"] = prep.tasks
        results["int8_accuracy"] = int8_accuracy(prep.repo)
        # On the perf_counter clock. A preparation that took over half the budget (building every artifact
        # on a slow machine) still leaves the sections half of it: a run that measures nothing shows nothing.
        deadline = max(
            time.perf_counter() - (time.time() - started) + cfg.budget_s, time.perf_counter() + cfg.budget_s / 2
        )
        tasks_deadline = deadline - cfg.reserve_s
        sections = {  # SECTIONS, in order; each one a module of bench/
            "gemm": lambda: bench_gemm(cfg),
            "backbone": lambda: bench_backbone(cfg, prep),
            "many_tasks": lambda: bench_tasks(cfg, prep, scratch, tasks_deadline),
            "load": lambda: bench_load(cfg, prep),
            "training": lambda: bench_training(cfg, prep, deadline),
        }
        assert tuple(sections) == SECTIONS
        for name, fn in sections.items():
            if name in cfg.skip:
                continue
            if time.perf_counter() > deadline:
                why = f"the suite's time budget ({cfg.budget_s:.0f} s) was spent"
                results.setdefault("skipped_sections", {})[name] = why
                log.warning("section %s skipped: time budget spent", name)
                continue
            t0 = time.perf_counter()
            log.info("== %s", name)
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001  (recorded; the other sections still run)
                log.error("section %s failed: %s", name, e)
                results["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
                log.debug("%s", traceback.format_exc())
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    except Exception as e:  # noqa: BLE001  (preparation failed: nothing else can run; still write what we have)
        log.error("preparation failed: %s", e)
        results["errors"]["prepare"] = "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    results["seconds"] = round(time.time() - started, 1)
    write_report(results, cfg.out / ("suite_quick.json" if cfg.quick_mode else "suite.json"), cfg)
    return results


def write_report(results: dict, json_path: Path, cfg: SuiteConfig) -> None:
    """The summary (goals and ratios), then the results JSON, plots and markdown, all from ``results``."""
    results["summary"] = summarize(results)
    results.pop("files", None)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["files"] = {"json": str(json_path)}
    if cfg.plots:
        try:
            results["files"]["plots"] = [str(p) for p in write_plots(results, cfg.out)]
        except Exception as e:  # noqa: BLE001
            log.error("plots failed: %s", e)
            results.setdefault("errors", {})["plots"] = str(e)
    if cfg.markdown:
        write_markdown(results, Path(cfg.markdown), cfg.out)
        results["files"]["markdown"] = str(cfg.markdown)
