"""The ``gemm`` section: float32 (and bf16) matrix-product GFLOP/s with torch on this CPU: the machine's limit."""

from __future__ import annotations

import time

import numpy as np

from bench.config import SuiteConfig


def bench_gemm(cfg: SuiteConfig) -> dict:
    """Matrix-product peak of this CPU with torch: n^3 products, float32 and bf16 alternating, best call."""
    import torch
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    torch.set_num_threads(cfg.threads or physical_cores())
    n = cfg.gemm_size
    operands = {}
    from fpt_deploy.cpu import cpu_features

    native_bf16 = cpu_features().native_bf16  # emulated bf16 would take minutes and show nothing
    for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        operands[str(dtype).split(".")[1]] = (a, b, torch.mm(a, b))  # the first call warms the thread pool
    x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    calls = {name: (lambda a=a, b=b, c=c: torch.mm(a, b, out=c)) for name, (a, b, c) in operands.items()}
    calls["numpy_float32"] = lambda: np.matmul(x, x)  # numpy's BLAS (OpenBLAS: OPENBLAS_* applies)
    best = dict.fromkeys(calls, float("inf"))
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < cfg.gemm_seconds and rounds < 1000):
        for name, fn in calls.items():  # alternate: a burst of load elsewhere hits every contender
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    out = {"size": n, "threads": torch.get_num_threads(), "rounds": rounds}
    if not native_bf16:
        out["skipped"] = {"bfloat16": "no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16): emulated"}
    out |= {f"{name}_gflops": 2 * n**3 / seconds / 1e9 for name, seconds in best.items()}
    out["peak_float32_gflops"] = max(out["float32_gflops"], out["numpy_float32_gflops"])
    return out
