"""``python -m bench``: the whole benchmark suite in one run (see ``bench/suite.py``).

    python -m bench                      # default: within --budget-s (BENCHMARKS.md: how long on which machine)
    python -m bench --quick              # shorter levels, fewer baselines
    python -m bench --repo deploy --checkpoint runs/mnist/best --out bench/results

Writes ``<out>/suite.json`` (``suite_quick.json`` with --quick), PNG plots in ``<out>``, and the
``BENCHMARKS.md`` table (``--markdown``), and prints the table. Exit status 1 when a section failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench.config import ROOT, SECTIONS, SuiteConfig
from bench.report import render_markdown
from bench.suite import run_suite, write_report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: list[str] | None = None) -> tuple[SuiteConfig, tuple[Path, dict] | None]:
    """The suite's settings, and with --report-only the saved run to report on (its path and results)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts and shorter levels (~2 minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="JSON results and plots")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="the table ('' to skip)")
    p.add_argument("--work", type=Path, help="cache of built artifacts (default <out>/work)")
    p.add_argument("--repo", type=Path, help="deployment repository with an MNIST-shaped task (default: built)")
    p.add_argument("--task", help="task of --repo to serve (default: its mnist task)")
    p.add_argument("--checkpoint", type=Path, help="MNIST checkpoint (default runs/mnist/best, else trained)")
    p.add_argument("--backbone", help="backbone of a checkpoint trained here (default minilm)")
    p.add_argument("--train-steps", type=int, help="steps of a checkpoint trained here")
    p.add_argument("--mix", type=int, help="distinct tasks mixed in the load (default 2)")
    p.add_argument("--concurrency", type=_ints, help="comma-separated, default 1,8,32")
    p.add_argument("--seconds", type=float, dest="level_seconds", help="at most this long per load level")
    p.add_argument("--requests", type=int, dest="level_requests", help="at most this many requests per level")
    p.add_argument("--rounds", type=int, dest="load_rounds", help="rounds over all load levels (default 2)")
    p.add_argument("--threads", type=int, help="intra-op threads everywhere (default physical cores)")
    p.add_argument("--skip", help=f"comma-separated sections to skip: {', '.join(SECTIONS)} (default: none)")
    p.add_argument(
        "--task-counts", type=_ints, help="tasks on one server in the many_tasks section, default 1,10,100,1000"
    )
    p.add_argument(
        "--max-resident-tasks",
        type=int,
        help="the paged fp32 contender's --max-resident-tasks, run at the N above it (default 256)",
    )
    p.add_argument("--budget-s", type=float, help="time budget of the whole suite in seconds (default 840)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="measure nothing: re-derive the goals, plots and markdown from a results file a run wrote",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("matplotlib", "PIL", "torch", "onnxscript", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = {
        k: getattr(args, k)
        for k in (
            "out",
            "work",
            "repo",
            "task",
            "checkpoint",
            "backbone",
            "train_steps",
            "mix",
            "concurrency",
            "level_seconds",
            "level_requests",
            "load_rounds",
            "threads",
            "task_counts",
            "max_resident_tasks",
            "budget_s",
        )
        if getattr(args, k) is not None
    }
    overrides["markdown"] = Path(args.markdown) if args.markdown else None
    overrides["plots"] = not args.no_plots
    if args.skip is not None:
        overrides["skip"] = tuple(s for s in args.skip.split(",") if s)
    config = SuiteConfig.quick(**overrides) if args.quick else SuiteConfig(**overrides)
    if args.report_only is None:
        return config, None
    try:
        saved = json.loads(args.report_only.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--report-only: cannot read {args.report_only} ({e}); pass the suite.json a run wrote")
    if not isinstance(saved, dict) or "machine" not in saved:
        p.error(f"--report-only: {args.report_only} is not a results file of python -m bench (no 'machine')")
    return config, (args.report_only, saved)


def main(argv: list[str] | None = None) -> int:
    config, saved = parse_args(argv)
    if saved is not None:
        path, results = saved
        write_report(results, path, config)
    else:
        results = run_suite(config)
    print(render_markdown(results))  # the console table; the files hold the same
    for kind, where in results.get("files", {}).items():
        print(f"{kind}: {where}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
