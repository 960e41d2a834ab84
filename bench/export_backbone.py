"""CPU throughput of the exported backbone (ONNX Runtime, fp32 and int8) vs the PyTorch body.

    python -m bench.export_backbone                     # minilm, MNIST shape (L=49), batch 1, 8, 32
    python -m bench.export_backbone --backbone tiny-bert --seconds 0.2   # smoke
    python -m bench.export_backbone --transformer-optimizer              # also the ORT optimizer's graph
    python -m bench.export_backbone --fp32-residual-sums                 # also fp32 without SkipLayerNorm
    python -m bench.export_backbone --smoothquant 0.75                   # also int8 with SmoothQuant

The graphs are the ones ``fpt-deploy export`` writes (``export.write_backbone_graph``, then
``export.quantize_backbone_int8``), built in a temporary folder. Each contender runs in short rounds
that alternate between contenders, and the best round counts: on a machine shared with other work
that is the figure closest to what the contender can do. Rows per second; ratios against PyTorch
measured in the same run; int8 against fp32 as exported. The files are the portable ones, timed as
they are (``bench.suite`` times them as the server loads them, rewritten by the ORT runtime).
``--fp32-residual-sums`` also times the fp32 graph with one step of that rewrite
(``serving.runtimes.ort_rewrite.residual_sums``): the part of its speed-up that is the avoided
SkipLayerNorm kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rows_per_second(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up: first calls allocate
    start, calls = time.perf_counter(), 0
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _transformer_optimized(src: Path, dst: Path, heads: int, hidden: int) -> None:
    """What ``onnxruntime.transformers.optimizer`` (model_type bert) makes of the graph.

    Its LayerNormalization/SkipLayerNormalization fusions are off: they need a per-model scale, and
    ours is per row (a graph input); they also fail on a LayerNormalization without a bias input.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_layer_norm = options.enable_skip_layer_norm = False
    model = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=heads, hidden_size=hidden, optimization_options=options, opt_level=0
    )
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    print(f"transformer optimizer fused: {stats or 'nothing'}")
    model.save_model_to_file(str(dst))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--length", type=int, default=49, help="tokens a row (MNIST: 49)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds a round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--transformer-optimizer", action="store_true", help="also time the ORT optimizer's graph")
    p.add_argument(
        "--fp32-residual-sums", action="store_true", help="also time fp32 with the int8 graph's Add->Sum rewrite"
    )
    p.add_argument(
        "--smoothquant", type=float, metavar="ALPHA", help="also time int8 with SmoothQuant (calibrated on random rows)"
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch
    from fpt_deploy.export import quantize_backbone_int8, write_backbone_graph

    from fpt_deploy.backbones import load_backbone

    torch.set_num_threads(args.threads)
    body = load_backbone(args.backbone).eval()
    d, n_norm = body.hidden_size, body.num_norms
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"ort fp32": Path(tmp) / "backbone.onnx", "ort int8": Path(tmp) / "backbone.int8.onnx"}
        write_backbone_graph(body, graphs["ort fp32"], opset=18)
        quantize_backbone_int8(graphs["ort fp32"], graphs["ort int8"])
        if args.smoothquant is not None:  # speed depends on the graph's structure, not on the calibration rows
            weight, bias = (t.numpy() for t in body.default_norms())
            calib = [
                {
                    "hidden": np.random.default_rng(1).standard_normal((8, args.length, d), dtype=np.float32),
                    "attention_mask": np.ones((8, args.length), np.int64),
                    "norm_weight": np.broadcast_to(weight, (8, n_norm, d)).copy(),
                    "norm_bias": np.broadcast_to(bias, (8, n_norm, d)).copy(),
                }
            ]
            graphs["ort int8 sq"] = Path(tmp) / "backbone.int8sq.onnx"
            quantize_backbone_int8(graphs["ort fp32"], graphs["ort int8 sq"], calibration=calib, alpha=args.smoothquant)
        if args.fp32_residual_sums:
            import onnx
            from fpt_deploy.serving.runtimes.ort_rewrite import residual_sums

            model = onnx.load(str(graphs["ort fp32"]))
            residual_sums(model)
            graphs["ort fp32 sums"] = Path(tmp) / "backbone.sums.onnx"
            onnx.save(model, str(graphs["ort fp32 sums"]))
        if args.transformer_optimizer:
            graphs["ort fp32 + transformer optimizer"] = Path(tmp) / "backbone.opt.onnx"
            _transformer_optimized(graphs["ort fp32"], graphs["ort fp32 + transformer optimizer"], body.heads, d)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {
            k: ort.InferenceSession(str(v), options, providers=["CPUExecutionProvider"]) for k, v in graphs.items()
        }

    rng = np.random.default_rng(0)
    weight, bias = (t.numpy() for t in body.default_norms())
    results = {}
    cpu = _cpu_model()
    print(
        f"{args.backbone} body, L={args.length}, {args.threads} threads, {cpu}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        feed = {
            "hidden": rng.standard_normal((batch, args.length, d), dtype=np.float32),
            "attention_mask": np.ones((batch, args.length), np.int64),
            "norm_weight": np.broadcast_to(weight, (batch, n_norm, d)).copy(),
            "norm_bias": np.broadcast_to(bias, (batch, n_norm, d)).copy(),
        }
        tensors = [torch.from_numpy(feed[k]) for k in ("hidden", "attention_mask", "norm_weight", "norm_bias")]

        def run_torch(tensors=tensors):
            with torch.inference_mode():
                body(*tensors)

        contenders = {"torch": run_torch, **{k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}}
        best = dict.fromkeys(contenders, 0.0)
        for _ in range(args.rounds):  # alternate, so a burst of load elsewhere hits every contender
            for name, fn in contenders.items():
                best[name] = max(best[name], _rows_per_second(fn, batch, args.seconds))
        results[batch] = best
        line = ", ".join(
            f"{k} {v:7.1f} rows/s" + ("" if k == "torch" else f" ({v / best['torch']:.2f}x torch)")
            for k, v in best.items()
        )
        ratio = f"int8/fp32 {best['ort int8'] / best['ort fp32']:.2f}x"
        if "ort int8 sq" in best:
            ratio += f", int8 sq/fp32 {best['ort int8 sq'] / best['ort fp32']:.2f}x"
        if "ort fp32 sums" in best:
            ratio += f", int8/(fp32 sums) {best['ort int8'] / best['ort fp32 sums']:.2f}x"
        print(f"batch {batch:3d}: {line}; {ratio}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "backbone": args.backbone,
                    "length": args.length,
                    "threads": args.threads,
                    "cpu": cpu,
                    "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
                    "rows_per_second": results,
                },
                indent=2,
            )
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
