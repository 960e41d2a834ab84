"""Turns the suite's results into ratios, goal checks, PNG plots and the BENCHMARKS.md table.

Every plotted figure is a ratio against a baseline measured in the same run (the torch-per-task
server, the raw backbone, the 1-task server, full fine-tuning), so a busy or a faster machine moves
numerator and denominator together.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from bench.config import FPT_PAGED, FPT_PREFIX, ORT_PER_TASK, TORCH_PER_TASK
from bench.many_tasks import find_level, find_point, ratio

log = logging.getLogger("bench.report")


def _at(table: dict, key: int):
    """``table[key]`` whether the keys are ints (in memory) or strings (read back from JSON)."""
    if key in table:
        return table[key]
    return table.get(str(key))


def _level(levels: list[dict], concurrency: int) -> dict | None:
    return next((lv for lv in levels if lv["concurrency"] == concurrency), None)


def summarize(results: dict) -> dict:
    """Per-level ratios (vs both baselines and vs the raw backbone) and the serving goals, met or not."""
    levels = results.get("load", {}).get("levels", {})
    raw = results.get("backbone", {}).get("rows_per_s", {})
    max_batch = int(results.get("config", {}).get("max_batch_size", 32))
    rows = []
    for name, contender in levels.items():
        for lv in contender:
            c = lv["concurrency"]
            row = {k: lv.get(k) for k in ("concurrency", "rows_per_s", "p50_ms", "p99_ms", "p99_over_p50", "errors")}
            row["contender"] = name
            for base in (TORCH_PER_TASK, ORT_PER_TASK):
                ref = _level(levels.get(base, []), c)
                ok = ref and ref["rows_per_s"]
                row[f"over_{base.replace(' ', '_')}"] = lv["rows_per_s"] / ref["rows_per_s"] if ok else None
            if name.startswith(FPT_PREFIX):  # the ceiling timed right after this level, else the backbone section's
                ceiling = lv.get("raw_backbone_rows_per_s") or _at(
                    raw.get(f"ort {name[len(FPT_PREFIX) :]}", {}), min(c, max_batch)
                )
                row["raw_backbone_rows_per_s"] = ceiling
                row["over_raw_backbone"] = lv["rows_per_s"] / ceiling if ceiling else None
            rows.append(row)

    def find(contender: str, c: int) -> dict | None:
        return next((r for r in rows if r["contender"] == contender and r["concurrency"] == c), None)

    goals = []

    def goal(what: str, value, target: float, higher_is_better: bool = True, note: str = "") -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        goals.append(
            {
                "goal": what,
                "value": value,
                "target": target,
                "higher_is_better": higher_is_better,
                "met": met,
                "note": note,
            }
        )

    top = max((lv["concurrency"] for c in levels.values() for lv in c), default=32)
    torch_raw = _at(raw.get("torch eager", {}), max_batch)
    for variant in ("fp32", "int8"):
        r = find(f"{FPT_PREFIX}{variant}", top)
        body = _at(raw.get(f"ort {variant}", {}), max_batch)
        lead = body / torch_raw if body and torch_raw else None
        why = ""
        if lead is not None and lead < 2.0:  # the body's own lead bounds the server's (the reason, measured)
            why = f"the ORT {variant} body is {lead:.2f}x torch eager at batch {max_batch} on this CPU (raw backbone)"
        goal(f"server {variant} c={top} / torch per task", r and r.get("over_torch_per_task"), 2.0, note=why)
        goal(
            f"server {variant} c={top} / raw backbone {variant} batch {min(top, max_batch)}",
            r and r.get("over_raw_backbone"),
            0.85,
        )
        r8 = find(f"{FPT_PREFIX}{variant}", 8)
        goal(f"server {variant} p99/p50 at c=8", r8 and r8.get("p99_over_p50"), 3.0, higher_is_better=False)
    fp32, int8 = _at(raw.get("ort fp32", {}), max_batch), _at(raw.get("ort int8", {}), max_batch)
    gemm = results.get("gemm", {}).get("peak_float32_gflops")
    flops = results.get("backbone", {}).get("flops_per_row")
    why = ""
    if fp32 and gemm and flops:  # the closer fp32 runs to the matrix units' peak, the less int8 has to win
        why = f"the fp32 body already runs at {fp32 * flops / 1e9 / gemm:.0%} of this CPU's fp32 GEMM peak"
    goal(f"raw backbone int8 / fp32 at batch {max_batch}", int8 / fp32 if fp32 and int8 else None, 1.8, note=why)
    acc = results.get("int8_accuracy", {})
    task = results.get("repository", {}).get("task")
    drop = acc.get(task, {}).get("drop_points") if task else None
    real = results.get("checkpoint", {}).get("real")
    goal(
        "int8 accuracy drop (points, held-out MNIST)",
        drop,
        0.5,
        higher_is_better=False,
        note="" if real else "checkpoint trained briefly here: not meaningful",
    )
    points = (results.get("many_tasks") or {}).get("contenders", {}).get(f"{FPT_PREFIX}fp32", [])
    mem = [p for p in points if p["tasks"] <= 100 and "rss_mb" in p]  # the memory goal is set up to 50 tasks
    if len(mem) >= 2:
        goal(
            f"server RSS {mem[-1]['tasks']} tasks / 1 task",
            mem[-1]["rss_mb"] / mem[0]["rss_mb"],
            1.2,
            higher_is_better=False,
        )
    peak = {}
    if gemm and flops:
        for name, by_batch in raw.items():
            rate = _at(by_batch, max_batch)
            if rate:
                peak[name] = rate * flops / 1e9 / gemm
    return {
        "levels": rows,
        "goals": goals,
        "many_task_goals": many_task_goals(results),
        "fraction_of_gemm_peak": peak,
        "top_concurrency": top,
    }


def many_task_goals(results: dict) -> list[dict]:
    """The many-task goals from the many_tasks section; a goal that cannot be measured here says why."""
    many = results.get("many_tasks") or {}
    if not many.get("contenders"):
        return []
    fp32 = f"{FPT_PREFIX}fp32"
    stopped = many.get("stopped", {})
    goals = []

    def goal(what: str, value, target: float, higher: bool = True, note: str = "") -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        goals.append(
            {"goal": what, "value": value, "target": target, "higher_is_better": higher, "met": met, "note": note}
        )

    def rate(contender: str, n: int, c: int, kind: str = "uniform") -> float | None:
        level = find_level(many, contender, n, kind, c)
        return level and level.get("rows_per_s")

    top = max(results.get("config", {}).get("concurrency", [32]))
    mid = 100 if 100 in many["counts"] else many["counts"][-1]
    ort_note = ""
    if rate(ORT_PER_TASK, mid, top) is None and ORT_PER_TASK in stopped:
        measured = [p["tasks"] for p in many["contenders"].get(ORT_PER_TASK, [])]
        largest = max(measured, default=None)
        ort_note = f"ort per task stopped at N={stopped[ORT_PER_TASK]['at_tasks']}: {stopped[ORT_PER_TASK]['reason']}"
        if largest:
            at = ratio(rate(fp32, mid, top), rate(ORT_PER_TASK, largest, top))
            ort_note += f"; vs its N={largest} throughput: {_fmt(at, '.2f')}"
    raw = results.get("backbone", {}).get("rows_per_s", {}).get("ort fp32", {})
    batch = min(top, results.get("config", {}).get("max_batch_size", top))
    gain = ratio(_at(raw, batch), _at(raw, 1))
    if not ort_note and gain is not None and gain < 3.0:  # one-row requests spread over tasks: batch 1 a task
        ort_note = f"the body's batch-{batch} / batch-1 rows/s is {gain:.2f} on this CPU: the most batching can win"
    goal(
        f"{mid} tasks, uniform, c={top}: fp32 / ort per task",
        ratio(rate(fp32, mid, top), rate(ORT_PER_TASK, mid, top)),
        3.0,
        note=ort_note,
    )
    own = ratio(rate(fp32, mid, top), rate(fp32, 1, top))
    own_note = ""
    pair = (many.get("interleaved") or {}).get("servers", {})
    if _at(pair, mid) and _at(pair, 1):  # the same two servers, levels alternated: the figure to go by
        n_many, n_one = _at(pair, mid), _at(pair, 1)
        own_note = (
            f"median of {len(n_many['rows_per_s'])} alternated rounds, both servers up: "
            f"{n_many['median']:.1f} vs {n_one['median']:.1f} rows/s; "
            f"the table's cells, minutes apart: {_fmt(own, '.2f')}"
        )
        own = n_many["median"] / n_one["median"]
    goal(f"{mid} tasks, uniform, c={top}: fp32 / its own 1-task throughput", own, 0.9, note=own_note)
    big = many["counts"][-1]
    one, every, paged = find_point(many, fp32, 1), find_point(many, fp32, big), find_point(many, FPT_PAGED, big)
    loaded = paged or every  # 1,000 tasks as one would serve them: rows of the recently used in memory
    rss_note = ""
    if paged and every:
        resident = many.get("max_resident_tasks")
        kept = ratio(rate(FPT_PAGED, big, top), rate(fp32, big, top))
        rss_note = (
            f"{FPT_PAGED}: rows of {resident} tasks in memory, the others read back on use; every task resident: "
            f"{_fmt(ratio(every['rss_mb'], one and one['rss_mb']), '.2f')} ({_fmt(every['rss_mb'], '.0f')} MB). "
            f"Paged rows/s, uniform c={top}: {_fmt(kept, '.2f')} of every-task-resident"
        )
    goal(
        f"{big} tasks loaded: RSS / 1 task",
        ratio(loaded and loaded["rss_mb"], one and one["rss_mb"]),
        1.5,
        higher=False,
        note=rss_note,
    )
    goal(
        f"{big} tasks loaded: start-up (s)",
        loaded and loaded["startup_s"],
        30.0,
        higher=False,
        note=f"every task resident: {_fmt(every['startup_s'], '.1f')} s" if paged and every else "",
    )
    level = find_level(many, fp32, 1, "uniform", 1)
    raw = level and level.get("raw_backbone_rows_per_s")
    c1_note = ""
    if level and raw and level.get("p50_ms") and level["rows_per_s"] < 0.9 * raw:
        c1_note = f"p50 {level['p50_ms']:.2f} ms a request against {1000 / raw:.2f} ms for the body called back to back"
        where = level.get("server_ms") or {}
        if "backbone" in where:
            heads = where.get("input_head", 0) + where.get("output_head", 0)
            c1_note += (
                f"; in the server (its /metrics, same level) the body took {where['backbone']:.2f} ms a call, the "
                f"heads {heads:.2f}, the queue {where.get('queue', 0):.2f}, the rest is HTTP in server and client"
            )
        c1_note += "; `python -m bench.idle_gap` times the body after the idle gaps a server has between requests"
    goal("c=1: fp32 / raw backbone at batch 1", ratio(level and level["rows_per_s"], raw), 0.9, note=c1_note)
    return goals


# ------------------------------------------------------------------------------------------------- plots


def write_plots(results: dict, out: Path) -> list[Path]:
    """PNG figures, each a ratio against a baseline of the same run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    summary = results.get("summary") or summarize(results)
    rows = summary["levels"]

    slug = machine_slug(results.get("machine", {}))

    def save(fig, name: str) -> None:
        path = out / f"{Path(name).stem}-{slug}.png"  # one set of plots per machine, like the tables
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    contenders = [c for c in dict.fromkeys(r["contender"] for r in rows)]
    concurrencies = sorted({r["concurrency"] for r in rows})
    if rows and any(r.get("over_torch_per_task") for r in rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(contenders), 1)
        for i, name in enumerate(contenders):
            values = [
                next(
                    (
                        r.get("over_torch_per_task") or 0
                        for r in rows
                        if r["contender"] == name and r["concurrency"] == c
                    ),
                    0,
                )
                for c in concurrencies
            ]
            xs = [k + (i - (len(contenders) - 1) / 2) * width for k in range(len(concurrencies))]
            ax.bar(xs, values, width, label=name)
        ax.axhline(2.0, color="k", ls="--", lw=1, label="goal 2x")
        ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
        ax.set_ylabel("rows/s / torch per task (same c)")
        ax.set_title("Mixed-task serving throughput vs one PyTorch model per task")
        ax.legend(fontsize=8)
        save(fig, "throughput_vs_torch_per_task.png")

    fpt_rows = [r for r in rows if r["contender"].startswith(FPT_PREFIX) and r.get("over_raw_backbone")]
    if fpt_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["contender"] for r in fpt_rows):
            mine = [r for r in fpt_rows if r["contender"] == name]
            ax.plot([r["concurrency"] for r in mine], [r["over_raw_backbone"] for r in mine], "o-", label=name)
        ax.axhline(0.85, color="k", ls="--", lw=1, label="goal 0.85")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (one row a request)")
        ax.set_ylabel("server rows/s / raw backbone rows/s")
        ax.set_title("Server overhead: fraction of the raw backbone (batch = min(c, max batch))")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        save(fig, "server_over_raw_backbone.png")

    backbone = results.get("backbone", {}).get("rows_per_s", {})
    torch_rates = backbone.get("torch eager", {})
    if backbone and torch_rates:
        batches = sorted(int(b) for b in torch_rates)
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [n for n in backbone if n != "torch eager"]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [(_at(backbone[name], b) or 0) / _at(torch_rates, b) for b in batches]
            ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(batches))], values, width, label=name)
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("rows/s / PyTorch eager body")
        ax.set_title("Raw backbone throughput vs PyTorch eager (same run)")
        ax.legend(fontsize=8)
        save(fig, "backbone_vs_torch.png")

    steps = results.get("training", {}).get("steps", [])
    ref = next((s for s in steps if s["mode"] != "fpt" and s["precision"] == "fp32"), None)
    if steps and ref:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{s['mode']}\n{s['precision']}" for s in steps]
        ax.bar(range(len(steps)), [s["steps_per_s"] / ref["steps_per_s"] for s in steps])
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xticks(range(len(steps)), labels, fontsize=8)
        ax.set_ylabel("steps/s / full fine-tuning fp32")
        ax.set_title("CPU training step speed (same model, same batch)")
        save(fig, "training_vs_full_finetune.png")

    many = results.get("many_tasks") or {}
    if many.get("contenders"):
        top = max(results.get("config", {}).get("concurrency", [32]))
        for what, ylabel, value in (
            ("rows", f"rows/s at c={top}", None),
            ("memory", "resident memory (MB)", "rss_mb"),
        ):
            fig, ax = plt.subplots(figsize=(6.5, 4))
            for name, points in many["contenders"].items():
                for kind, style in (("uniform", "o-"), ("zipf", "s--")) if value is None else ((None, "o-"),):
                    xs, ys = [], []
                    for p in points:
                        y = (
                            p.get(value)
                            if value
                            else (find_level(many, name, p["tasks"], kind, top) or {}).get("rows_per_s")
                        )
                        if y:
                            xs.append(p["tasks"])
                            ys.append(y)
                    if xs:
                        ax.plot(xs, ys, style, label=name if kind is None else f"{name} ({kind})")
            ax.set_xscale("log")
            ax.set_xlabel("tasks on one server (N)")
            ax.set_ylabel(ylabel)
            if value:
                ax.set_yscale("log")
            ax.set_title(f"{'Throughput' if value is None else 'Memory'} vs N tasks (one row a request)")
            ax.legend(fontsize=7)
            save(fig, f"many_tasks_{what}_vs_n.png")
    return written


def machine_key(machine: dict) -> str:
    """What identifies a machine in BENCHMARKS.md: its CPU, its features, its core count."""
    return f"{machine.get('cpu_described') or machine.get('cpu')}, {machine.get('cores_physical')} cores"


def machine_slug(machine: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", machine_key(machine).lower()).strip("-")[:60]


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(value, spec: str = ".1f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def render_markdown(results: dict, plots_dir: Path | None = None, relative_to: Path | None = None) -> str:
    summary = results.get("summary") or summarize(results)
    m = results.get("machine", {})
    cfg = results.get("config", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench{' --quick' if results.get('quick') else ''}` on {results.get('started')} "
        f"in {results.get('seconds')} s. Every ratio is against a baseline measured in the same run. "
        "Re-run on a quiet machine for figures to quote; the load average below says how busy this one was.",
        "",
        "Reproduce: `make bench` (= `.venv/bin/python -m bench`, within 15 minutes on 2 cores: `--budget-s`) or "
        "`.venv/bin/python -m bench --quick` (about 7 minutes once the artifacts are cached); "
        "`--repo DIR --checkpoint runs/mnist/best` to measure a real deployment. Results: "
        "`bench/results/suite.json` (`suite_quick.json`), plots `bench/results/*.png`. The suite is "
        "`bench/suite.py` (one module a section: `bench/gemm.py`, `backbone.py`, `many_tasks.py`, `load.py`, "
        "`training.py`); the baselines' server is `bench/baseline_server.py`.",
        "",
        "## Machine",
        "",
    ]
    flags = ", ".join(k for k, v in m.get("flags", {}).items() if v) or "-"
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    env = ", ".join(f"{k}={v}" for k, v in sorted(m.get("env", {}).items())) or "-"
    lines += _table(
        ["what", "value"],
        [
            ["CPU", str(m.get("cpu"))],
            ["cores (physical / logical)", f"{m.get('cores_physical')} / {m.get('cores_logical')}"],
            ["memory", f"{m.get('memory_gb')} GB"],
            ["SIMD flags", flags],
            ["versions", versions],
            ["thread environment", env],
            [
                "load average (1 min) start / end",
                f"{_fmt(m.get('load_avg_1m_start'), '.2f')} / {_fmt(m.get('load_avg_1m_end'), '.2f')}",
            ],
        ],
    )
    ck = results.get("checkpoint", {})
    if ck:
        lines += [
            "## Setup",
            "",
            f"- Backbone **{ck.get('backbone')}** ({ck.get('fingerprint')}); checkpoint `{ck.get('path')}` "
            f"({ck.get('source')}, held-out accuracy {_fmt(ck.get('test_accuracy'), '.4f')}).",
            f"- Tasks mixed in the load: {', '.join(results.get('tasks', []))} (MNIST-shaped rows, 49 tokens; "
            "clones of one task's heads under new names). One real held-out image a request, binary KServe v2, "
            "tasks round-robin, closed loop.",
            f"- Server and baselines: max batch {cfg.get('max_batch_size')}, max queue delay "
            f"{cfg.get('max_queue_delay_ms')} ms, intra-op threads {cfg.get('threads') or 'physical cores'}.",
            "- **torch per task**: `bench/baseline_server.py --runtime torch`: FastAPI + uvicorn, each task its own "
            "PyTorch FPT with its own body copy, one worker thread that batches what is waiting (same max batch "
            "and delay) and runs one call per task present.",
            "- **ort per task**: the same server, each task's whole model (heads + body) exported to its own ONNX "
            "and run in its own ONNX Runtime session (same session options and ONNX Runtime fusions as fpt-deploy).",
            f"- Load: {results.get('load', {}).get('rounds', 1)} round(s), each over every level of every contender "
            "in turn; a level's figures are the mean over its rounds. **/ raw backbone** divides by the raw "
            "backbone (ORT, the server's session options, batch min(c, max batch), real rows) timed in this "
            "process right after that fpt-deploy level, so numerator and denominator share the same minute.",
            "",
        ]
    for note in results.get("notes", []):
        lines.append(f"> {note}")
    if results.get("notes"):
        lines.append("")
    goals = summary.get("goals", [])
    if goals:
        lines += ["## Goals (issue 5)", ""]
        lines += _goals_table(goals)
    lines += _many_tasks_markdown(results, summary)
    levels = summary.get("levels", [])
    if levels:
        lines += ["## Mixed-task serving throughput (one row a request)", ""]
        lines += _table(
            [
                "contender",
                "c",
                "rows/s",
                "p50 ms",
                "p99 ms",
                "p99/p50",
                "/ torch per task",
                "/ ort per task",
                "/ raw backbone",
                "errors",
            ],
            [
                [
                    r["contender"],
                    str(r["concurrency"]),
                    _fmt(r["rows_per_s"]),
                    _fmt(r["p50_ms"]),
                    _fmt(r["p99_ms"]),
                    _fmt(r["p99_over_p50"], ".2f"),
                    _fmt(r.get("over_torch_per_task"), ".2f"),
                    _fmt(r.get("over_ort_per_task"), ".2f"),
                    _fmt(r.get("over_raw_backbone"), ".2f"),
                    str(r["errors"]),
                ]
                for r in sorted(levels, key=lambda r: (r["concurrency"], r["contender"]))
            ],
        )
    bb = results.get("backbone", {})
    if bb:
        rates = bb["rows_per_s"]
        batches = sorted({int(b) for v in rates.values() for b in v})
        gemm = results.get("gemm", {})
        lines += [
            f"## Raw backbone ({bb['backbone']}, {bb['row_tokens']} tokens a row, {bb['threads']} threads)",
            "",
        ]
        if gemm:
            lines += [
                f"Matrix-product peak ({gemm.get('size')}^3, {gemm.get('threads')} threads, best call): torch "
                f"float32 {_fmt(gemm.get('float32_gflops'))} GFLOP/s, numpy float32 "
                f"{_fmt(gemm.get('numpy_float32_gflops'))} GFLOP/s, torch bf16 "
                f"{_fmt(gemm.get('bfloat16_gflops'))} GFLOP/s; the float32 peak is the larger float32 figure. "
                f"One row through the body is {_fmt((bb.get('flops_per_row') or 0) / 1e9, '.3f')} GFLOP.",
                "",
            ]
        torch_rates = rates.get("torch eager", {})
        peak = summary.get("fraction_of_gemm_peak", {})
        lines += _table(
            [
                "contender",
                *[f"batch {b} rows/s" for b in batches],
                "/ torch eager (largest batch)",
                "of fp32 GEMM peak (largest batch)",
            ],
            [
                [
                    name,
                    *[_fmt(_at(v, b)) for b in batches],
                    _fmt((_at(v, batches[-1]) or 0) / (_at(torch_rates, batches[-1]) or float("nan")), ".2f"),
                    _fmt(100 * peak[name], ".0f") + "%" if name in peak else "-",
                ]
                for name, v in rates.items()
            ],
        )
    acc = results.get("int8_accuracy", {})
    if acc:
        lines += ["## int8 accuracy (export's held-out check)", ""]
        lines += _table(
            ["task", "fp32", "int8", "drop (points)"],
            [
                [
                    t,
                    _fmt(100 * a["fp32"], ".2f") + "%",
                    _fmt(100 * a["int8"], ".2f") + "%",
                    _fmt(a["drop_points"], ".2f"),
                ]
                for t, a in acc.items()
            ],
        )
    tr = results.get("training", {})
    if tr.get("steps"):
        ref = next((s for s in tr["steps"] if s["mode"] != "fpt" and s["precision"] == "fp32"), None)
        lines += [f"## Training step speed on CPU ({tr['backbone']}, {tr['task']}, batch {tr['batch']})", ""]
        lines += _table(
            ["step", "precision", "trainable params", "steps/s", "rows/s", "/ full fine-tuning fp32"],
            [
                [
                    s["mode"],
                    s["precision"],
                    f"{s['trainable_params']:,}",
                    _fmt(s["steps_per_s"], ".2f"),
                    _fmt(s["rows_per_s"]),
                    _fmt(s["steps_per_s"] / ref["steps_per_s"], ".2f") if ref else "-",
                ]
                for s in tr["steps"]
            ],
        )
    if plots_dir is not None:
        pngs = [Path(p) for p in results.get("files", {}).get("plots", [])]  # this run's, not stale ones
        if pngs:
            lines += ["## Plots", ""]
            for p in pngs:
                rel = os.path.relpath(p.resolve(), relative_to) if relative_to else str(p)
                lines.append(f"![{p.stem}]({rel})")
            lines.append("")
    if results.get("errors"):
        lines += ["## Sections that failed", ""]
        lines += [f"- **{k}**: `{v}`" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def _goals_table(goals: list[dict]) -> list[str]:
    """Markdown rows: each goal's measured value against its target, and whether it is met."""
    return _table(
        ["goal", "measured", "target", "met"],
        [
            [
                g["goal"],
                _fmt(g["value"], ".2f"),
                f"{'>=' if g['higher_is_better'] else '<='} {g['target']:g}",
                ("-" if g["met"] is None else "yes" if g["met"] else "**no**")
                + (f" ({g['note']})" if g["note"] else ""),
            ]
            for g in goals
        ],
    )


def _many_tasks_markdown(results: dict, summary: dict) -> list[str]:
    many = results.get("many_tasks") or {}
    if not many.get("contenders"):
        return []
    lines = []
    goals = summary.get("many_task_goals") or many_task_goals(results)
    if goals:
        lines += ["## Goals (issue 14: many tasks)", ""]
        lines += _goals_table(goals)
    concurrency = results.get("config", {}).get("concurrency", [1, 8, 32])
    top = max(concurrency)
    lines += [
        "## N tasks on one server",
        "",
        f"N MNIST-shaped tasks (the real one and N - 1 of its head shape with random weights), one held-out row "
        f"a request, traffic spread uniformly or by Zipf (s = {many.get('zipf_s')}) over the tasks, closed loop. "
        "Start-up: process start to ready. RSS: after every level.",
        "",
    ]
    header = ["contender", "N", "traffic", *[f"c={c} rows/s" for c in concurrency], f"c={top} p50 / p99 ms"]
    header += ["start-up s", "RSS MB"]
    cells = []
    for name, points in many["contenders"].items():
        for p in points:
            for kind in many.get("traffic", ["uniform"]):
                if not any(find_level(many, name, p["tasks"], kind, c) for c in concurrency):
                    continue  # levels this contender did not run at this N (per-task servers at large N)
                at_top = find_level(many, name, p["tasks"], kind, top) or {}
                cells.append(
                    [
                        name,
                        str(p["tasks"]),
                        kind,
                        *[
                            _fmt((find_level(many, name, p["tasks"], kind, c) or {}).get("rows_per_s"))
                            for c in concurrency
                        ],
                        f"{_fmt(at_top.get('p50_ms'))} / {_fmt(at_top.get('p99_ms'))}",
                        _fmt(p["startup_s"]),
                        _fmt(p["rss_mb"], ".0f"),
                    ]
                )
    lines += _table(header, cells)
    for name, stop in many.get("stopped", {}).items():
        lines.append(f"- **{name}** was not started at N = {stop['at_tasks']}: {stop['reason']}.")
    skipped = {**results.get("gemm", {}).get("skipped", {}), **results.get("training", {}).get("skipped", {})}
    for what, why in skipped.items():
        lines.append(f"- {what} skipped: {why}.")
    return lines + [""]


MACHINE_START, MACHINE_END = "<!-- machine: ", "<!-- end machine -->"
NOTES_START = "<!-- notes: written by hand"  # from this line on, BENCHMARKS.md is kept as it is


def write_markdown(results: dict, path: Path, plots_dir: Path | None = None) -> None:
    """Write this machine's section of ``path``, keeping the sections of other machines as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = machine_key(results.get("machine", {}))
    body = render_markdown(results, plots_dir, path.parent.resolve())
    body = "\n".join(("#" + line if line.startswith("#") else line) for line in body.splitlines()[1:]).strip()
    block = f"{MACHINE_START}{key} -->\n## {key}\n\n{body}\n{MACHINE_END}"
    others = []
    if path.is_file():
        text = path.read_text()
        pattern = re.compile(re.escape(MACHINE_START) + r"(.*?) -->\n.*?" + re.escape(MACHINE_END), re.S)
        others = [m.group(0) for m in pattern.finditer(text) if m.group(1) != key]
        if MACHINE_START not in text and text.startswith("# Benchmarks"):  # written before sections per machine
            others.append(_legacy_block(text))
    intro = (
        "# Benchmarks\n\nOne section per machine `python -m bench` ran on; each section's figures and ratios "
        "come from one run on that machine. Re-running on a machine replaces its section only."
    )
    notes = []
    if path.is_file() and NOTES_START in (text := path.read_text()):  # written by hand: kept as it is
        notes.append(text[text.index(NOTES_START) :].strip())
    path.write_text("\n\n".join([intro, block, *others, *notes]) + "\n")


def _legacy_block(text: str) -> str:
    """A BENCHMARKS.md from before one section per machine, kept as the section of the machine it names."""
    cpu = re.search(r"^\| CPU \| (.*?) \|$", text, re.M)
    key = f"{cpu.group(1) if cpu else 'unknown CPU'} (an earlier version of the suite)"
    body = "\n".join(("#" + line if line.startswith("#") else line) for line in text.strip().splitlines()[1:]).strip()
    return f"{MACHINE_START}{key} -->\n## {key}\n\n{body}\n{MACHINE_END}"
