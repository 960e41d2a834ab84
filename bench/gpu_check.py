"""One prepared GPU check (issue 5): run it on a machine with a CUDA GPU.

    python -m bench.gpu_check --backbone minilm --out gpu_check.json

Measures, on the GPU, in one run:
1. FPT training on MNIST (bf16 autocast, the CLI's training loop): held-out accuracy and steps/s, for a
   few learning rates, plus one fp32 run to check that bf16 keeps accuracy;
2. the FPT step vs a full fine-tuning step of the same model and batch;
3. backbone inference throughput: PyTorch fp32 and bf16 vs ONNX Runtime's CUDA provider (when present),
   with the ORT-vs-PyTorch parity of the exported backbone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fpt_deploy.backbones import load_backbone
from fpt_deploy.model import FPT
from fpt_deploy.tasks import get_task

log = logging.getLogger("bench.gpu_check")


def _sync_time(fn, iters: int, warmup: int = 5) -> float:
    """Seconds per call of ``fn`` on the GPU (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def train_runs(backbone: str, epochs: int, batch_size: int, lrs: list[float]) -> list[dict]:
    from fpt_deploy.training import TrainConfig, train

    runs = []
    for lr, bf16 in [(lr, True) for lr in lrs] + [(lrs[0], False)]:
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(
                task="mnist",
                backbone=backbone,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                device="cuda",
                bf16=bf16,
                out=Path(out),
                progress=False,
            )
            r = train(config)
            history = torch.load(Path(out) / "last" / "trainer_state.pt", weights_only=False)["history"]
        runs.append(
            {
                "lr": lr,
                "bf16": bf16,
                "epochs": epochs,
                "batch_size": batch_size,
                "steps": r.steps,
                "seconds": round(r.seconds, 2),
                "steps_per_s": round(r.steps / r.seconds, 1),
                "best_accuracy": r.best_accuracy,
                "accuracy_by_epoch": [round(h["test_accuracy"], 4) for h in history],
            }
        )
        log.info("train %s", runs[-1])
    return runs


def step_speed(backbone: str, batch_size: int) -> dict:
    """FPT step vs full fine-tuning step, same model and batch, bf16 autocast."""
    task = get_task("mnist")
    x = torch.randint(0, 256, (batch_size, 28, 28), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (batch_size,), device="cuda")
    out = {}
    for mode in ("fpt", "full"):
        body = load_backbone(backbone)
        model = FPT(task, body).cuda()
        if mode == "full":
            for p in model.body.parameters():
                p.requires_grad_(True)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = _sync_time(step, 50)
        out[mode] = {"steps_per_s": round(1 / sec, 1), "samples_per_s": round(batch_size / sec)}
        for p in model.body.parameters():  # the body is shared through the registry cache: refreeze it
            p.requires_grad_(False)
        model.body.cpu()
    out["fpt_over_full"] = round(out["fpt"]["steps_per_s"] / out["full"]["steps_per_s"], 2)
    return out


def inference_speed(backbone: str, batches: list[int], length: int = 49) -> dict:
    import numpy as np

    body = load_backbone(backbone).cuda().eval()
    d, n = body.hidden_size, body.num_norms
    result: dict = {"length": length, "torch_fp32": {}, "torch_bf16": {}}
    for b in batches:
        h = torch.randn(b, length, d, device="cuda")
        m = torch.ones(b, length, dtype=torch.int64, device="cuda")
        w, bias = [t.expand(b, -1, -1).contiguous().cuda() for t in body.default_norms()]
        with torch.no_grad():
            sec = _sync_time(lambda: body(h, m, w, bias), 30)
            result["torch_fp32"][b] = round(b / sec)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sec = _sync_time(lambda: body(h, m, w, bias), 30)
            result["torch_bf16"][b] = round(b / sec)
    try:
        import onnxruntime as ort
    except ImportError:
        result["ort_cuda"] = "onnxruntime is not installed"
        return result
    providers = ort.get_available_providers()
    result["ort_providers"] = providers
    if "CUDAExecutionProvider" not in providers:
        result["ort_cuda"] = "CUDAExecutionProvider not available in this onnxruntime build"
        return result
    from fpt_deploy.export.graphs import write_backbone_graph

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.onnx"
        write_backbone_graph(body.cpu(), path, 18)
        body.cuda()
        sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        result["ort_session_providers"] = sess.get_providers()
        result["ort_cuda"], diffs = {}, []
        for b in batches:
            g = np.random.default_rng(b)
            feeds = {
                "hidden": g.standard_normal((b, length, d), dtype=np.float32),
                "attention_mask": np.ones((b, length), dtype=np.int64),
                "norm_weight": np.broadcast_to(body.default_norms()[0].cpu().numpy(), (b, n, d)).copy(),
                "norm_bias": np.broadcast_to(body.default_norms()[1].cpu().numpy(), (b, n, d)).copy(),
            }
            with torch.no_grad():
                ref = body(*[torch.from_numpy(v).cuda() for v in feeds.values()]).cpu().numpy()
            diffs.append(float(np.abs(sess.run(None, feeds)[0] - ref).max()))
            for _ in range(5):
                sess.run(None, feeds)
            start = time.perf_counter()
            for _ in range(30):
                sess.run(None, feeds)  # includes host<->device copies, as a server sees them
            result["ort_cuda"][b] = round(b * 30 / (time.perf_counter() - start))
        result["ort_vs_torch_max_abs_diff"] = max(diffs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lrs", default="1e-3,3e-3")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run this on a GPU machine")
    facts = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backbone": args.backbone,
    }
    t0 = time.perf_counter()
    report = {
        "facts": facts,
        "train": train_runs(args.backbone, args.epochs, args.batch_size, [float(v) for v in args.lrs.split(",")]),
        "step_speed_batch64": step_speed(args.backbone, 64),
        "inference": inference_speed(args.backbone, [1, 32, 256]),
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    elif os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
