"""Multi-task training in one job vs each task alone, same budget: held-out accuracy and peak memory.

    .venv/bin/python bench/multitask_train.py                    # bit-xor, bit-memory (n=100 patch=10), mnist
    .venv/bin/python bench/multitask_train.py --steps 200 --backbone minilm

Every run is its own process, so each peak RSS (``ru_maxrss``, the resident high-water mark) is that
run's alone: the one job's peak is compared with the SUM of the three separate jobs' peaks (what
three processes training side by side would hold). Each task gets the same steps, batch, lr and seed
in both modes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["bit-xor", "bit-memory", "mnist"]
OPTIONS = [
    "bit-xor:train_size=4000",
    "bit-xor:test_size=300",
    "bit-memory:n=100",
    "bit-memory:patch=10",
    "bit-memory:train_size=4000",
    "bit-memory:test_size=300",
    "mnist:test_fraction=0.1",
]


def _worker(args: argparse.Namespace) -> None:
    """Train ``args.tasks`` as one job in this process; print one JSON line with the figures."""
    import torch
    from fpt_deploy.training import TrainConfig, multitask_configs, train_multitask

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    options = [o for o in OPTIONS if o.split(":", 1)[0] in tasks]
    settings = TrainConfig(
        backbone=args.backbone,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.steps,
        device="cpu",
        seed=0,
        progress=False,
    )
    start = time.perf_counter()
    results = train_multitask(multitask_configs(settings, tasks, options, Path(args.out)))
    print(
        json.dumps(
            {
                "tasks": {r.task: {"accuracy": r.final_accuracy, "trainable": r.trainable_params} for r in results},
                "seconds": time.perf_counter() - start,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                "frozen_params": results[0].total_params - results[0].trainable_params,
            }
        )
    )


def _run(args: argparse.Namespace, tasks: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--tasks",
        ",".join(tasks),
        "--out",
        str(out),
        "--backbone",
        args.backbone,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(tasks)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per task (both modes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--out", default="/tmp/fpt-bench-multitask")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tasks", default=",".join(TASKS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)

    out = Path(args.out)
    job = _run(args, TASKS, out / "job")
    alone = {t: _run(args, [t], out / "alone") for t in TASKS}
    print(
        f"backbone {args.backbone} ({job['frozen_params']:,} "
        f"frozen params), {args.steps} steps x batch {args.batch_size} per task, lr {args.lr}, CPU"
    )
    print(f"{'task':<12}{'trainable':>10}{'alone acc':>11}{'job acc':>9}{'diff (pt)':>11}{'alone RSS MiB':>15}")
    for t in TASKS:
        a, j = alone[t]["tasks"][t]["accuracy"], job["tasks"][t]["accuracy"]
        print(
            f"{t:<12}{job['tasks'][t]['trainable']:>10,}{a:>11.4f}{j:>9.4f}{100 * (j - a):>+11.2f}"
            f"{alone[t]['peak_rss_mib']:>15.0f}"
        )
    total = sum(alone[t]["peak_rss_mib"] for t in TASKS)
    largest = max(alone[t]["peak_rss_mib"] for t in TASKS)
    print(
        f"peak RSS: one job {job['peak_rss_mib']:.0f} MiB vs 3 separate jobs {total:.0f} MiB in sum "
        f"({job['peak_rss_mib'] / total:.2f}x); the largest single job {largest:.0f} MiB"
    )
    print(
        f"wall time: one job {job['seconds']:.0f}s vs separate {sum(alone[t]['seconds'] for t in TASKS):.0f}s "
        "(training only, process start-up excluded)"
    )


if __name__ == "__main__":
    main()
