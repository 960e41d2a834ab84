"""N ``fpt-deploy export`` processes adding N different tasks to one repository at once, run many times.

    python -m bench.concurrent_export                 # 20 runs of 4 processes (bit-xor, bit-memory, listops, mnist)
    python -m bench.concurrent_export --runs 3 --out bench/results/concurrent_export.json

Each run starts every process at once into a fresh repository, waits for all, then checks that every
process exited 0, that the manifest lists all N tasks on one backbone, and that the server's loader
(``ServingModel``) opens all N. Checkpoints are trained once (a few steps on tiny-bert) and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("bit-xor", "bit-memory", "listops", "mnist")
SMALL = {
    "bit-xor": {"train_size": 64, "test_size": 32},
    "bit-memory": {"train_size": 64, "test_size": 32, "n": 20, "patch": 5},
    "listops": {"train_size": 64, "test_size": 32, "max_len": 48, "min_len": 4, "max_depth": 3},
    "mnist": {},
}


def train_checkpoints(root: Path, tasks: tuple[str, ...]) -> dict[str, Path]:
    from fpt_deploy.training import TrainConfig, train

    out = {}
    for task in tasks:
        run = root / task
        if not (run / "best").exists():
            train(
                TrainConfig(
                    task=task,
                    backbone="tiny-bert",
                    steps=2,
                    batch_size=16,
                    out=run,
                    task_options=SMALL[task],
                    progress=False,
                )
            )
        out[task] = run / "best"
    return out


def export_concurrently(checkpoints: dict[str, Path], repo: Path) -> list[subprocess.CompletedProcess]:
    """Start one ``fpt-deploy export`` process per checkpoint into ``repo``, all at once; wait for all."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fpt_deploy.cli", "export", "--checkpoint", str(path), "--repo", str(repo)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in checkpoints.values()
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(), None, p.stderr.read()) for p in procs]


def one_run(checkpoints: dict[str, Path], repo: Path) -> dict:
    from fpt_deploy.serving import ServeConfig, ServingModel

    from fpt_deploy.artifacts import MANIFEST, open_repository

    t0 = time.perf_counter()
    done = export_concurrently(checkpoints, repo)
    codes = [d.returncode for d in done]
    errors = [d.stderr[-400:] for d in done if d.returncode != 0]
    listed = sorted(open_repository(repo).tasks) if (repo / MANIFEST).exists() else []
    served = []
    if set(listed) == set(checkpoints):
        model = ServingModel(ServeConfig(repo=repo, threads=1))
        served = sorted(model.tasks)
        model.close()
    return {
        "exit_codes": codes,
        "listed": listed,
        "served": served,
        "ok": not errors and served == sorted(checkpoints),
        "seconds": round(time.perf_counter() - t0, 1),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints and repositories")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fpt-concurrent-export-"))
    checkpoints = train_checkpoints(work / "checkpoints", tuple(args.tasks))
    runs = []
    for i in range(args.runs):
        result = one_run(checkpoints, work / f"repo-{i}")
        runs.append(result)
        print(
            f"run {i + 1:2d}/{args.runs}: exit codes {result['exit_codes']}, manifest lists {len(result['listed'])}/"
            f"{len(checkpoints)}, server opens {len(result['served'])}/{len(checkpoints)}, {result['seconds']} s"
            + ("" if result["ok"] else f"  FAILED {result['errors']}"),
            flush=True,
        )
        if args.out:  # after every run, so an interrupted series keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"processes": len(checkpoints), "tasks": args.tasks, "runs": runs}, indent=2)
            )
    ok = sum(r["ok"] for r in runs)
    print(f"{ok}/{len(runs)} runs: all {len(checkpoints)} tasks listed and servable ({platform.processor() or 'cpu'})")
    sys.exit(0 if ok == len(runs) else 1)


if __name__ == "__main__":
    main()
