"""What the suite measures and for how long (``SuiteConfig``), its sections, and the contenders' names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.server_process import ROOT

SECTIONS = ("gemm", "backbone", "many_tasks", "load", "training")  # in the order they run
FPT_PREFIX = "fpt-deploy "  # every fpt-deploy contender's name starts with it
FPT_FP32, FPT_INT8 = "fpt-deploy fp32", "fpt-deploy int8"
FPT_PAGED = "fpt-deploy fp32 paged"  # the fp32 server with --max-resident-tasks (SuiteConfig.max_resident_tasks)
TORCH_PER_TASK, ORT_PER_TASK = "torch per task", "ort per task"


@dataclass
class SuiteConfig:
    """What to measure and how long; ``quick()`` gives the shorter variant."""

    out: Path = ROOT / "bench" / "results"  # JSON results and PNG plots
    markdown: Path | None = ROOT / "BENCHMARKS.md"  # the table; None: not written
    work: Path | None = None  # cache of built artifacts; default <out>/work
    repo: Path | None = None  # deployment repository with an MNIST-shaped task; default: built here
    checkpoint: Path | None = None  # MNIST checkpoint; default runs/mnist/best, else trained here
    backbone: str = "minilm"  # for a checkpoint trained here
    train_steps: int = 40  # steps of a checkpoint trained here (throughput work only)
    task: str | None = None  # task of --repo to serve (default: its mnist task)
    mix: int = 2  # distinct tasks mixed in the load (the task and mix-1 clones)
    concurrency: tuple[int, ...] = (1, 8, 32)
    level_seconds: float = 5.0  # at most this long per load level and round
    load_rounds: int = 1  # rounds over every load level of every contender (figures: the mean)
    raw_seconds_in_load: float = 3.0  # the raw backbone timed right after each fpt-deploy level
    level_requests: int = 2000  # at most this many requests per load level
    raw_batches: tuple[int, ...] = (1, 8, 32)
    raw_seconds: float = 1.0  # per round and contender
    raw_rounds: int = 2
    gemm_size: int = 2048
    gemm_seconds: float = 2.0
    train_batch: int = 32
    train_timed_steps: int = 5  # timed optimizer steps per training configuration (after 1 warm-up)
    train_seconds: float = 20.0  # at most this long per training configuration
    threads: int | None = None  # intra-op threads everywhere; default physical cores
    task_counts: tuple[int, ...] = (1, 10, 100, 1000)  # N tasks on one server (many_tasks section)
    tasks_level_seconds: float = 3.0  # at most this long per level of the many_tasks section
    tasks_requests_cycled: int = 2048  # requests drawn from the traffic distribution, then cycled
    per_task_max_tasks: int = 100  # per-task baselines never start more tasks than this
    per_task_max_rss_gb: float = 12.0  # ... nor when their projected resident memory exceeds this
    per_task_max_startup_s: float = 180.0  # ... nor when their projected start-up takes longer
    baseline_full_levels_tasks: int = 10  # beyond this N, per-task servers run only uniform at the top c
    max_resident_tasks: int = 256  # the paged fp32 contender's --max-resident-tasks (N above it only)
    goal_rounds: int = 3  # fp32 at N=1 and N=100 measured again, alternated, for the goal comparing them
    budget_s: float = 14 * 60.0  # the whole suite; levels past it are skipped (and say so)
    reserve_s: float = 200.0  # kept for the sections after many_tasks (load, training)
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    plots: bool = True
    skip: tuple[str, ...] = ()  # sections not to run
    quick_mode: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.skip if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
        if self.mix < 1:
            raise ValueError(f"mix must be >= 1 (got {self.mix})")
        if self.max_resident_tasks < self.max_batch_size:
            raise ValueError(
                f"max_resident_tasks must be >= max_batch_size {self.max_batch_size} (got {self.max_resident_tasks})"
            )
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work else self.out / "work"

    @classmethod
    def quick(cls, **overrides) -> SuiteConfig:
        quick = dict(
            train_steps=10,
            concurrency=(1, 8, 32),
            level_seconds=2.0,
            load_rounds=1,
            raw_seconds_in_load=1.0,
            level_requests=400,
            raw_seconds=0.4,
            raw_rounds=2,
            gemm_seconds=1.0,
            train_timed_steps=2,
            train_seconds=5.0,
            tasks_level_seconds=1.5,
            tasks_requests_cycled=1024,
            per_task_max_tasks=10,
            budget_s=7 * 60.0,
            reserve_s=90.0,
            quick_mode=True,
        )
        return cls(**{**quick, **overrides})
