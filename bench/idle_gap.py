"""The body at batch 1 after an idle gap, beside back to back: what a server at concurrency 1 meets.

    python -m bench.idle_gap --repo deploy [--task mnist] [--threads N] [--calls 300]

At concurrency 1 a server idles between requests while the response travels and the client answers.
On some machines a core that idled for a millisecond or more runs the next call slower (clock, caches,
a virtual CPU the host descheduled). The raw-backbone figure the suite divides by is timed back to back,
so it does not pay that. This times ``OrtRuntime.run_backbone`` at batch 1 with the server's session
options, back to back and after sleeps of 0.5 to 3 ms, and prints the median time of each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

GAPS_MS = (0.0, 0.5, 1.0, 2.0, 3.0)


def measure(repo: Path, task: str, threads: int | None, calls: int) -> dict:
    from fpt_deploy.serving.runtimes.ort import OrtRuntime
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    from fpt_deploy.artifacts import open_repository

    r = open_repository(repo)
    art = r.task(task)
    backbone = r.backbones[art.fingerprint]
    weight, bias = art.load_norms(r.root)
    threads = threads or physical_cores()
    runtime = OrtRuntime(backbone.path(r.root), weight[None], bias[None], threads=threads)
    try:
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((1, art.spec.seq_len, backbone.hidden_size)).astype(np.float32)
        mask, index = np.ones((1, art.spec.seq_len), np.int64), np.zeros(1, np.int64)
        for _ in range(20):  # warm-up
            runtime.run_backbone(hidden, mask, index)
        medians = {}
        for gap in GAPS_MS:
            times = []
            for _ in range(calls):
                if gap:
                    time.sleep(gap / 1000)  # the idle gap is what is measured: the core rests, as between requests
                t0 = time.perf_counter()
                runtime.run_backbone(hidden, mask, index)
                times.append(time.perf_counter() - t0)
            medians[gap] = 1000 * float(np.median(times))
    finally:
        runtime.close()
    return {"task": task, "tokens": art.spec.seq_len, "threads": threads, "calls": calls, "median_ms": medians}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.idle_gap", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="deployment repository")
    p.add_argument("--task", default="mnist", help="task whose row length and norms are used (default mnist)")
    p.add_argument("--threads", type=int, help="intra-op threads (default physical cores, as the server)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per gap")
    args = p.parse_args(argv)
    result = measure(args.repo, args.task, args.threads, args.calls)
    back_to_back = result["median_ms"][0.0]
    for gap, ms in result["median_ms"].items():
        print(f"idle {gap:3.1f} ms before each call: median {ms:5.2f} ms ({back_to_back / ms:.2f} of back to back)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
