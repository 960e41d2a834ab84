"""The ``backbone`` section: the shared body alone at batch 1, 8, 32 (32 = the server's ceiling).

ONNX Runtime fp32 and int8 with the server's own session options (``serving.runtimes.ort.OrtRuntime``),
and the PyTorch eager body. Contenders alternate in short rounds and the best round counts (the
machine is shared). ``raw_rate`` and ``backbone_rows`` also time the ceiling the server sections divide by.
"""

from __future__ import annotations

import time

import numpy as np

from bench.config import SuiteConfig
from bench.prepare import Prepared


def body_flops_per_row(config: dict, length: int) -> float | None:
    """Multiply-adds x2 of one row through a BERT/GPT-2 body: the dense layers plus attention."""
    d = config.get("hidden_size") or config.get("n_embd")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    ff = config.get("intermediate_size") or config.get("n_inner") or (4 * d if d else None)
    if not (d and layers and ff):
        return None
    dense = 2 * length * (4 * d * d + 2 * d * ff)  # qkv (3 D^2) + attention output (D^2) + the two FF layers
    attention = 4 * length * length * d  # Q.K^T and P.V
    return float(layers * (dense + attention))


def raw_rate(fn, batch: int, seconds: float) -> float:
    """Rows/s of ``fn`` (one backbone call of ``batch`` rows) over about ``seconds``."""
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - t0 < seconds and calls < 10_000):
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - t0)


def backbone_rows(prep: Prepared, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """What the server's backbone sees: the task's input head on ``batch`` real held-out rows.

    hidden (B, L, D) float32, attention_mask (B, L) int64.
    """
    from fpt_deploy.serving.runtimes.sessions import create_head_session

    from fpt_deploy.artifacts import open_repository, verify_file

    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    head = create_head_session(verify_file(r.root, art.files["input"], art.sha256["input"]))
    hidden, mask = head.run(None, {"input": prep.rows[np.arange(batch) % len(prep.rows)]})
    return hidden, mask


def bench_backbone(cfg: SuiteConfig, prep: Prepared) -> dict:
    """Rows/s of the body alone: ORT (server session options) fp32/int8 and PyTorch eager, per batch."""
    import torch
    from fpt_deploy.serving.runtimes.ort import OrtRuntime
    from fpt_deploy.serving.runtimes.sessions import physical_cores

    from fpt_deploy.artifacts import open_repository
    from fpt_deploy.backbones import load_backbone

    r = open_repository(prep.repo)
    art = r.tasks[prep.task]
    b = r.backbones[art.fingerprint]
    weight, bias = art.load_norms(r.root)
    length = art.spec.seq_len
    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    runtimes = {v: OrtRuntime(b.path(r.root, v), weight[None], bias[None], threads=threads) for v in prep.variants}
    body = load_backbone(b.name).eval()
    results: dict[str, dict[int, float]] = {f"ort {v}": {} for v in runtimes} | {"torch eager": {}}
    for batch in cfg.raw_batches:
        hidden, mask = backbone_rows(prep, batch)
        index = np.zeros(batch, np.int64)
        t_args = (
            torch.from_numpy(hidden),
            torch.from_numpy(mask),
            torch.from_numpy(weight).expand(batch, -1, -1),
            torch.from_numpy(bias).expand(batch, -1, -1),
        )

        def run_torch(t_args=t_args):
            with torch.inference_mode():
                body(*t_args)

        contenders = {
            f"ort {v}": (lambda rt=rt, h=hidden, m=mask, i=index: rt.run_backbone(h, m, i))
            for v, rt in runtimes.items()
        }
        contenders["torch eager"] = run_torch
        for fn in contenders.values():
            fn()  # warm-up: first calls allocate
        for _ in range(cfg.raw_rounds):  # alternate, so a burst of load elsewhere hits every contender
            for name, fn in contenders.items():
                rate = raw_rate(fn, batch, cfg.raw_seconds)
                results[name][batch] = max(results[name].get(batch, 0.0), rate)
    for rt in runtimes.values():
        rt.close()
    return {
        "backbone": b.name,
        "row_tokens": length,
        "threads": threads,
        "flops_per_row": body_flops_per_row(b.extra.get("config", {}), length),
        "rows_per_s": results,
    }
