"""The ``fpt-deploy`` command line. Each command builds a config and makes one library call, the
Python API's (``fpt_deploy/api.py``, docs/api.md): the same function a notebook calls.

A command's options are its config dataclass's fields (``fpt_deploy/cli_options.py``): defaults,
choices and help are written once, in the dataclass. The config modules import without torch; heavy
imports (torch, onnxruntime, the server) happen inside the commands, so ``--help`` stays quick.
Errors raised on purpose (``FptDeployError``) print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import typer

from fpt_deploy.attention import AttentionConfig
from fpt_deploy.cli_options import field_help, options_from
from fpt_deploy.errors import FptDeployError
from fpt_deploy.export.config import ExportConfig
from fpt_deploy.export.triton import TritonConfig
from fpt_deploy.serving.config import PredictConfig, ServeConfig
from fpt_deploy.serving.runtimes.tensorrt.config import EngineConfig
from fpt_deploy.training.config import EvaluateConfig, TrainConfig
from fpt_deploy.training.reproduce import ReproduceConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: option names are never cut on an 80-column terminal
    help="Frozen pretrained transformers: train per-task heads, export once, serve many tasks.",
)
log = logging.getLogger("fpt_deploy")


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
            if e.exit_without_teardown:  # e.g. a torchrun rank: see FptDeployError.exit_without_teardown
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            raise typer.Exit(2) from None

    return wrapper


def _package_version() -> str:
    try:
        return version("fpt-deploy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fpt-deploy {_package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # Plain messages for train/export progress; `serve` switches its own logs to time and level.
    logging.basicConfig(level=level, format="%(message)s", handlers=[_StderrHandler()], force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub", "safetensors"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
def backbones() -> None:
    """List the registered backbones (a local Hugging Face folder of a known family works too)."""
    from fpt_deploy.backbones import list_backbones

    entries = list_backbones()
    width = max(len(b.name) for b in entries)
    for b in entries:
        typer.echo(f"{b.name:<{width}}  {b.description}  [{b.source}; from {b.origin}]")


@app.command()
def tasks() -> None:
    """List the registered tasks with their options and defaults."""
    from fpt_deploy.tasks import list_task_entries

    for entry in list_task_entries():
        t = entry.value
        opts = " ".join(f"{k}={v}" for k, v in t.option_defaults().items())
        typer.echo(f"{t.name:<12} {t.description}  [{entry.origin}]\n{'':<12} options: {opts or '-'}")


OPTION_HELP = "Task option KEY=VALUE (repeatable), e.g. -o n=100 -o patch=10 for bit-memory; see `fpt-deploy tasks`."
TASKS_HELP = (
    "Several tasks trained as ONE job against one shared frozen body, comma-separated (e.g. "
    "bit-xor,bit-memory,mnist); each gets OUT/<task>/best and OUT/<task>/last (OUT default runs). "
    "Give an option to one task as -o TASK:KEY=VALUE (e.g. -o bit-memory:n=100); -o KEY=VALUE sets "
    "it for every task."
)


@app.command()
@_user_errors
@options_from(TrainConfig, exclude=("task",))
def train(
    config: Callable[..., TrainConfig],
    task: str | None = typer.Option(
        None, "--task", "-t", help=f"{field_help(TrainConfig, 'task')}  [default: {TrainConfig.task}]"
    ),
    tasks: str | None = typer.Option(None, "--tasks", help=TASKS_HELP),
    option: list[str] | None = typer.Option(None, "--option", "-o", help=OPTION_HELP),
) -> None:
    """Fine-tune only the FPT parameters (input layer, positions, norms, output layer) of TASK.

    Data-parallel as it is under `torchrun --nproc-per-node N -m fpt_deploy.cli train ...` (rank 0 logs
    and writes the checkpoints); a single process needs no launcher.
    """
    from fpt_deploy.api import train as run_training
    from fpt_deploy.errors import ConfigError
    from fpt_deploy.training import multitask_configs
    from fpt_deploy.training.multitask import parse_task_list

    if task is not None and tasks is not None:
        raise ConfigError("pass --task for one task or --tasks for several, not both")
    given_file = config.keywords.get("task_file") is not None
    if given_file and (task is not None or tasks is not None):
        raise ConfigError("pass --task-file or --task/--tasks, not both")
    names = parse_task_list(tasks) if tasks is not None else [task] if task else []
    settings = config(progress=sys.stderr.isatty(), **({"task": names[0]} if names else {}))
    configs = multitask_configs(
        settings, names or [settings.task], option or [], config.keywords.get("out"), per_task_folders=tasks is not None
    )
    for result in run_training(configs):
        if result.rank == 0:
            typer.echo(
                f"{result.task}: best validation accuracy {result.best_accuracy:.4f} "
                f"(test {_pct(result.test_accuracy)}) after {result.steps} steps "
                f"in {result.seconds:.0f}s; trainable {result.trainable_params:,} of {result.total_params:,} "
                f"parameters; checkpoint {result.checkpoint}"
            )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a torchrun job, finished cleanly: every checkpoint is written and the group is left,
        # but gloo's threads can still abort the process during interpreter teardown (SIGABRT), as after
        # a user error (``exit_without_teardown``). Leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
@_user_errors
@options_from(EvaluateConfig)
def evaluate(config: Callable[..., EvaluateConfig]) -> None:
    """Print a checkpoint's accuracy on the test split (no choice saw it), or on its validation split."""
    from fpt_deploy.api import evaluate as run_evaluation

    r = run_evaluation(config())
    split = {"test": "test", "val": "validation"}[r["split"]]
    typer.echo(
        f"{r['task']}: {split} accuracy {r['accuracy']:.4f} on {r['examples']} {split} examples (loss {r['loss']:.4f})"
    )


@app.command()
@_user_errors
@options_from(AttentionConfig)
def attention(config: Callable[..., AttentionConfig]) -> None:
    """Draw a checkpoint's attention maps: one panel per layer and head, for one or a few examples."""
    from fpt_deploy.attention import draw_attention

    r = draw_attention(config())
    n, layers, heads = r.maps.shape[:3]
    typer.echo(f"{r.task}: attention of {n} example(s), {layers} layers x {heads} heads written to {r.out}")


@app.command()
@_user_errors
@options_from(ReproduceConfig)
def reproduce(config: Callable[..., ReproduceConfig]) -> None:
    """Run the paper's grid (body start x trained groups x tasks x seeds); write results.md/.json and plots.

    Resumes: cells already in OUT/results.json are skipped.
    """
    from fpt_deploy.training.reproduce import run_reproduction

    r = run_reproduction(config())
    typer.echo(
        f"{r.ran} cell(s) trained, {r.skipped} already done, in {r.seconds / 60:.1f} min: "
        f"{r.out / 'results.md'}, {r.out / 'results.json'}, {r.out / 'convergence.png'}"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@app.command()
@_user_errors
@options_from(ServeConfig)
def serve(config: Callable[..., ServeConfig]) -> None:
    """Serve every task of REPO over the Open Inference Protocol (KServe v2 HTTP, as Triton speaks it).

    One body and one dynamic batcher serve all tasks; stop with Ctrl-C (in-flight requests finish).
    """
    from fpt_deploy.api import serve as run_server

    run_server(config())


@app.command()
@_user_errors
@options_from(PredictConfig)
def predict(config: Callable[..., PredictConfig]) -> None:
    """Offline batch inference of TASK on the rows of INPUT, through the server's runtime and batcher."""
    from fpt_deploy.api import predict as run_predict

    typer.echo(run_predict(config()).summary())


@app.command()
@_user_errors
@options_from(TritonConfig, param="triton", only=("backend",))
@options_from(ExportConfig)
def export(
    config: Callable[..., ExportConfig],
    triton: Callable[..., TritonConfig],
    format: Literal["onnx", "triton"] = typer.Option(
        "onnx",
        "--format",
        help="triton: also write a Triton model repository to REPO/triton (with no --task/--checkpoint, "
        "from what REPO already holds).",
    ),
) -> None:
    """Export tasks to a deployment repository: the body ONNX once, per-task heads and norms, validated."""
    repo = config.keywords.get("repo", ExportConfig.repo)
    given = config.keywords.get("tasks") or config.keywords.get("checkpoints")
    if format == "triton" and not given:
        return _write_triton(triton(repo=repo))
    from fpt_deploy.export import export_task

    result = export_task(config())
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
    if format == "triton":
        _write_triton(triton(repo=result.repo))


def _write_triton(config: TritonConfig) -> None:
    from fpt_deploy.export.triton import write_triton_repository

    result = write_triton_repository(config)
    typer.echo(
        f"Triton model repository {result.out}: backbone {', '.join(result.backbones)}; "
        f"ensembles {', '.join(result.tasks)}"
    )


@app.command("build-engine")
@_user_errors
@options_from(EngineConfig)
def build_engine(config: Callable[..., EngineConfig]) -> None:
    """Build a TensorRT engine of the backbone, wrapped with a Gather by task index from resident norm tables.

    Needs an NVIDIA GPU, TensorRT and cuda-python (`pip install 'fpt-deploy[gpu,tensorrt]'`), no torch. Checks
    the engine against ONNX Runtime at the smallest, the tuned and the largest shape, then records it in
    the repository with its limits and the task order of its norm tables.
    """
    from fpt_deploy.serving.runtimes.tensorrt.build import build_engine as build

    result = build(config())
    parity = ", ".join(f"{point}: {diff:.2e}" for point, diff in result.parity.items())
    typer.echo(
        f"{result.path}: {result.variant} in {result.seconds:.0f}s; max |TensorRT - ONNX Runtime| at {parity}; "
        f"norm tables: {', '.join(result.tasks)}"
    )


if __name__ == "__main__":
    app()
