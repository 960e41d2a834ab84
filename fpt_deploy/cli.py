"""The ``fpt-deploy`` command line. Each command builds a config and makes one library call.

Heavy imports (torch, onnxruntime, the server) happen inside the commands, so ``--help`` is instant.
Errors raised on purpose (``FptDeployError``) print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from enum import Enum
from pathlib import Path

import typer

from fpt_deploy.errors import FptDeployError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Frozen pretrained transformers: train per-task heads, export once, serve many tasks.",
)
log = logging.getLogger("fpt_deploy")


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it between invocations)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def _user_errors(fn):
    """Turn an ``FptDeployError`` into one clear line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FptDeployError as e:
            typer.echo(f"error: {e}", err=True)
            if getattr(sys.modules.get("fpt_deploy.training.distributed"), "JOINED_PROCESS_GROUP", False):
                # A rank of a torchrun job: skip interpreter teardown, where torch.distributed's gloo
                # threads can still abort the process (SIGABRT) after this clean error.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[_StderrHandler()], force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub", "safetensors"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
def backbones() -> None:
    """List the registered backbones (any local Hugging Face BERT/GPT-2 folder works too)."""
    from fpt_deploy.backbones import list_backbones

    for b in list_backbones():
        typer.echo(f"{b.name:<14} {b.description}  [{b.source}]")


@app.command()
def tasks() -> None:
    """List the registered tasks with their options and defaults."""
    from fpt_deploy.tasks import list_tasks

    for t in list_tasks():
        opts = " ".join(f"{k}={v}" for k, v in t.option_defaults().items())
        typer.echo(f"{t.name:<12} {t.description}\n{'':<12} options: {opts or '-'}")


OPTION_HELP = "Task option KEY=VALUE (repeatable), e.g. -o n=100 -o patch=10 for bit-memory; see `fpt-deploy tasks`."


class DistBackend(str, Enum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


@app.command()
@_user_errors
def train(
    task: str = typer.Option(None, "--task", "-t", help="Task to train (see `fpt-deploy tasks`; default mnist)."),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Several tasks trained as ONE job against one shared frozen body, comma-separated (e.g. "
        "bit-xor,bit-memory,mnist); each gets OUT/<task>/best and OUT/<task>/last (OUT default runs). "
        "Give an option to one task as -o TASK:KEY=VALUE (e.g. -o bit-memory:n=100); -o KEY=VALUE sets "
        "it for every task.",
    ),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
    backbone: str = typer.Option("minilm", "--backbone", "-b", help="Backbone name or local HF folder."),
    epochs: int = typer.Option(3, help="Passes over the training data (ignored with --steps)."),
    steps: int = typer.Option(None, help="Total optimizer steps; overrides --epochs."),
    batch_size: int = typer.Option(32, help="Examples per step; under torchrun the global batch, split across ranks."),
    lr: float = typer.Option(1e-3, help="Adam (peak) learning rate; the paper's 1e-3."),
    schedule: Schedule = typer.Option(
        Schedule.cosine, help="cosine: 50-step linear warmup then cosine decay to 0; constant: the paper's."
    ),
    eval_every: int = typer.Option(None, help="Steps between held-out evaluations (default: once an epoch)."),
    stop_at: float = typer.Option(None, help="Stop once held-out accuracy reaches this (e.g. 1.0)."),
    device: Device = typer.Option(Device.auto, help="auto picks CUDA when a GPU is visible."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on for CUDA, off on CPU)."),
    dist_backend: DistBackend = typer.Option(
        DistBackend.auto, help="torch.distributed backend under torchrun: auto = NCCL on GPUs, gloo on CPU."
    ),
    seed: int = typer.Option(0, help="Random seed (data order, init, generated data)."),
    out: Path = typer.Option(None, help="Run folder (default runs/<task>); the best checkpoint goes to OUT/best."),
    resume: bool = typer.Option(False, help="Continue the run in OUT from its last saved state."),
    data_dir: Path = typer.Option(None, help="Data in torchvision's layout (MNIST, CIFAR-10)."),
    download: bool = typer.Option(False, help="Allow torchvision to download the data set."),
) -> None:
    """Fine-tune only the FPT parameters (input layer, positions, norms, output layer) of TASK.

    Data-parallel as it is under `torchrun --nproc-per-node N -m fpt_deploy.cli train ...` (rank 0 logs
    and writes the checkpoints); a single process needs no launcher.
    """
    from fpt_deploy.errors import ConfigError
    from fpt_deploy.training import TrainConfig, multitask_configs, train_multitask
    from fpt_deploy.training.multitask import parse_task_list

    if task is not None and tasks is not None:
        raise ConfigError("pass --task for one task or --tasks for several, not both")
    names = parse_task_list(tasks) if tasks is not None else [task or "mnist"]
    settings = TrainConfig(
        task=names[0],
        backbone=backbone,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule.value,
        eval_every=eval_every,
        stop_at_accuracy=stop_at,
        device=device.value,
        bf16=bf16,
        dist_backend=dist_backend.value,
        seed=seed,
        out=out,
        resume=resume,
        data_dir=data_dir,
        download=download,
        progress=sys.stderr.isatty(),
    )
    configs = multitask_configs(settings, names, option, out, per_task_folders=tasks is not None)
    for result in train_multitask(configs):
        if result.rank == 0:
            typer.echo(
                f"{result.task}: best held-out accuracy {result.best_accuracy:.4f} after {result.steps} steps "
                f"in {result.seconds:.0f}s; trainable {result.trainable_params:,} of {result.total_params:,} "
                f"parameters; checkpoint {result.checkpoint}"
            )


@app.command()
@_user_errors
def evaluate(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (or a run folder: its best checkpoint)."),
    data_dir: Path = typer.Option(None, help="Data in torchvision's layout (MNIST, CIFAR-10)."),
    download: bool = typer.Option(False, help="Allow torchvision to download the data set."),
    device: Device = typer.Option(Device.auto),
) -> None:
    """Print a checkpoint's held-out (test) accuracy."""
    from fpt_deploy.training import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, data_dir, download, device.value)
    typer.echo(f"{r['task']}: test accuracy {r['accuracy']:.4f} on {r['examples']} examples (loss {r['loss']:.4f})")


class ServeRuntime(str, Enum):
    ort = "ort"
    ort_cuda = "ort-cuda"
    tensorrt = "tensorrt"


RUNTIME_HELP = "ort: ONNX Runtime CPU; ort-cuda: its CUDA provider; tensorrt: the engine `build-engine` wrote."
VARIANT_HELP = "Backbone file of the repository: fp32, int8 (`export --quantize int8`); fp16 for tensorrt."
BATCH_HELP = "Rows per batch: requests of all tasks are batched together up to this many rows."
DELAY_HELP = "How long (ms) the oldest queued request waits for others to join its batch."
THREADS_HELP = "ONNX Runtime intra-op threads for the backbone (default: the physical cores)."


@app.command()
@_user_errors
def serve(
    repo: Path = typer.Option(..., help="Deployment repository written by `fpt-deploy export`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    runtime: ServeRuntime = typer.Option(ServeRuntime.ort, help=RUNTIME_HELP),
    backbone_variant: str = typer.Option("fp32", help=VARIANT_HELP),
    max_batch_size: int = typer.Option(32, help=BATCH_HELP),
    max_queue_delay_ms: float = typer.Option(2.0, help=DELAY_HELP),
    max_queue_size: int = typer.Option(1024, help="Queued requests beyond which new ones get 503."),
    pad_tolerance: float = typer.Option(0.25, help="Padding (fraction of real tokens) allowed to merge lengths."),
    threads: int = typer.Option(None, help=THREADS_HELP),
    engine: Path = typer.Option(None, help="TensorRT engine file (default: the one recorded in the repository)."),
    backbone: str = typer.Option(None, help="Backbone fingerprint (prefix) when the repository holds several."),
    max_body_mb: float = typer.Option(64.0, help="Larger request bodies are refused with 413."),
) -> None:
    """Serve every task of REPO over the Open Inference Protocol (KServe v2 HTTP, as Triton speaks it).

    One backbone and one dynamic batcher serve all tasks; stop with Ctrl-C (in-flight requests finish).
    """
    from fpt_deploy.serving import ServeConfig
    from fpt_deploy.serving import serve as run_server

    config = ServeConfig(
        repo=repo,
        host=host,
        port=port,
        runtime=runtime.value,
        backbone_variant=backbone_variant,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        max_queue_size=max_queue_size,
        pad_tolerance=pad_tolerance,
        threads=threads,
        engine=engine,
        fingerprint=backbone,
        max_body_bytes=int(max_body_mb * (1 << 20)),
    )
    run_server(config)


@app.command()
@_user_errors
def predict(
    repo: Path = typer.Option(..., help="Deployment repository written by `fpt-deploy export`."),
    task: str = typer.Option(..., "--task", "-t", help="Task (model) name in the repository."),
    input: Path = typer.Option(..., help="Raw inputs as .npy, shaped (N, *input_shape), e.g. uint8 (N, 28, 28)."),
    output: Path = typer.Option(None, help="Write labels and probabilities to this .npz or .json."),
    runtime: ServeRuntime = typer.Option(ServeRuntime.ort, help=RUNTIME_HELP),
    backbone_variant: str = typer.Option("fp32", help=VARIANT_HELP),
    max_batch_size: int = typer.Option(32, help="Rows per backbone call."),
    threads: int = typer.Option(None, help=THREADS_HELP),
    engine: Path = typer.Option(None, help="TensorRT engine file (default: the one recorded in the repository)."),
) -> None:
    """Offline batch inference of TASK on the rows of INPUT, through the server's runtime and batcher."""
    from fpt_deploy.serving import PredictConfig
    from fpt_deploy.serving import predict as run_predict

    config = PredictConfig(
        repo=repo,
        task=task,
        input=input,
        output=output,
        runtime=runtime.value,
        backbone_variant=backbone_variant,
        max_batch_size=max_batch_size,
        threads=threads,
        engine=engine,
    )
    typer.echo(run_predict(config).summary())


class Quantization(str, Enum):
    int8 = "int8"


class ExportFormat(str, Enum):
    onnx = "onnx"
    triton = "triton"


@app.command()
@_user_errors
def export(
    task: list[str] = typer.Option([], "--task", "-t", help="Task to export (repeatable, or a comma list)."),
    checkpoint: list[Path] = typer.Option(
        [],
        help="Checkpoint or run folder, one per --task in order (default runs/<task>/best); alone, it names "
        "its own task.",
    ),
    repo: Path = typer.Option(Path("deploy"), help="Deployment repository to write into (created if missing)."),
    opset: int = typer.Option(18, help="ONNX opset (>= 17)."),
    quantize: Quantization = typer.Option(None, help="Also write an int8 backbone variant, checked for accuracy."),
    force: bool = typer.Option(False, help="Keep the int8 variant even if a task loses more than the tolerance."),
    atol: float = typer.Option(1e-4, help="Largest allowed |ONNX Runtime - PyTorch| on logits."),
    accuracy_tolerance: float = typer.Option(0.5, help="Largest allowed int8 accuracy loss, in points."),
    data_dir: Path = typer.Option(None, help="Data in torchvision's layout (MNIST, CIFAR-10) for validation."),
    download: bool = typer.Option(False, help="Allow torchvision to download the data set."),
    format: ExportFormat = typer.Option(
        ExportFormat.onnx,
        "--format",
        help="triton: also write a Triton model repository to REPO/triton (with no "
        "--task/--checkpoint, from what REPO already holds).",
    ),
) -> None:
    """Export tasks to a deployment repository: the backbone ONNX once, per-task heads and norms, validated."""
    if format is ExportFormat.triton and not task and not checkpoint:
        return _write_triton(repo)
    from fpt_deploy.export import ExportConfig, export_task

    config = ExportConfig(
        tasks=[t.strip() for item in task for t in item.split(",")],
        checkpoints=checkpoint,
        repo=repo,
        opset=opset,
        quantize=quantize.value if quantize else None,
        force=force,
        atol=atol,
        accuracy_tolerance=accuracy_tolerance,
        data_dir=data_dir,
        download=download,
    )
    result = export_task(config)
    for name, t in result.tasks.items():
        acc = result.accuracy.get(name)
        int8 = f"; accuracy fp32 {100 * acc['fp32']:.2f}% int8 {100 * acc['int8']:.2f}%" if acc else ""
        typer.echo(
            f"{name}: max |ORT - PyTorch| {t.max_abs_diff:.2e}; heads + norms {t.bytes / 1024:.0f} KB"
            f"{'' if t.written else ' (unchanged)'}{int8}"
        )
    for fp, diff in result.mixed_batch_diff.items():
        typer.echo(f"backbone {fp[:16]}: mixed-task batch vs per-task max diff {diff:.2e}")
    written = ", ".join(result.backbones_written) or "none (already present)"
    typer.echo(f"repository {result.repo}: backbones written: {written}")
    if format is ExportFormat.triton:
        _write_triton(repo)


def _write_triton(repo: Path) -> None:
    from fpt_deploy.export.triton import TritonConfig, write_triton_repository

    result = write_triton_repository(TritonConfig(repo=repo))
    typer.echo(
        f"Triton model repository {result.out}: backbone {', '.join(result.backbones)}; "
        f"ensembles {', '.join(result.tasks)}"
    )


@app.command("build-engine")
@_user_errors
def build_engine(
    repo: Path = typer.Option(Path("deploy"), help="Deployment repository holding the exported backbone."),
    fp16: bool = typer.Option(False, help="MatMul/Gemm in fp16; normalisation, softmax and residuals stay fp32."),
    max_batch: int = typer.Option(64, help="Largest batch (rows of one call) the engine accepts."),
    max_len: int = typer.Option(512, help="Longest sequence (tokens a row) the engine accepts."),
    max_tasks: int = typer.Option(16, help="Most tasks in the resident norm tables (adding one needs no rebuild)."),
) -> None:
    """Build a TensorRT engine of the backbone, wrapped with a Gather by task index from resident norm tables.

    Needs tensorrt (10.x/11.x) and a CUDA GPU; checks the engine against ONNX Runtime and records it in
    the repository manifest with the task order of its norm tables.
    """
    from fpt_deploy.export.tensorrt import EngineConfig, build_trt_engine

    config = EngineConfig(repo=repo, fp16=fp16, max_batch=max_batch, max_len=max_len, max_tasks=max_tasks)
    result = build_trt_engine(config)
    typer.echo(
        f"{result.path}: {result.variant} in {result.seconds:.0f}s; max |TensorRT - ONNX Runtime| "
        f"{result.max_abs_diff:.2e}; norm tables: {', '.join(result.tasks)}"
    )


if __name__ == "__main__":
    app()
