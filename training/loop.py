"""The fine-tuning loop: Adam on the trainable tensors only, grad-norm clip, best checkpoint kept.

Run folder layout: ``best/`` (the checkpoint with the best validation accuracy) and ``last/`` (the latest
state, with optimizer state, so ``--resume`` continues where a run stopped).

Honest selection: a validation split carved from the training data (``val_fraction``, seeded) chooses the
best checkpoint and stops early; the test split is scored and reported, never used for a choice.

A job trains one or more tasks (``training.multitask``) against one frozen body: each task is a
``TaskRun`` with its own heads, norms, optimizer, data order and run folder, and the job takes one step
of each unfinished task in turn. Under ``torchrun`` every step is data-parallel (``training.distributed``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fpt_deploy.training.augment import augment_images, check_augmentable
from fpt_deploy.training.config import EvaluateConfig, TrainConfig
from fpt_deploy.training.distributed import (
    RanksDisagreeError,
    World,
    all_reduce_sums,
    check_ranks_agree,
    close_world,
    init_world,
    joined,
    resolve_device,
    shard,
    wrap_model,
)
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fpt_deploy.backbones import load_backbone
from fpt_deploy.checkpoint import TRAINER_STATE_FILE, load_checkpoint, read_checkpoint_config, save_checkpoint
from fpt_deploy.cpu import warn_if_bf16_emulated
from fpt_deploy.errors import CheckpointError
from fpt_deploy.model import FPT
from fpt_deploy.model_options import ModelOptions
from fpt_deploy.tasks import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What one task's training reached, as this rank saw it."""

    task: str
    best_accuracy: float  # on the validation split (it chose the best checkpoint)
    test_accuracy: float | None  # the best checkpoint's, on the test split no choice ever saw
    final_accuracy: float
    steps: int
    seconds: float  # wall time of the whole job (all its tasks)
    checkpoint: Path  # the best checkpoint's folder
    trainable_params: int
    total_params: int
    rank: int = 0  # this process's rank under torchrun (0 in a single process)


@dataclass(kw_only=True)
class RunningSums:
    """One rank's training figures since the last evaluation (summed over ranks before they are logged)."""

    loss_sum: float = 0.0  # cross-entropy summed over outputs
    correct: int = 0  # outputs predicted right
    outputs: int = 0  # outputs seen

    def add(self, loss_sum: float, correct: int, outputs: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.outputs += outputs

    def over_ranks(self, world: World) -> RunningSums:
        loss_sum, correct, outputs = all_reduce_sums([self.loss_sum, self.correct, self.outputs], world)
        return RunningSums(loss_sum=loss_sum, correct=int(correct), outputs=int(outputs))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.outputs, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.outputs, 1)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy over every output; (loss, correct outputs, outputs)."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (B * outputs, C)
    y = labels.reshape(-1)
    loss = F.cross_entropy(flat, y)
    return loss, int((flat.argmax(-1) == y).sum()), y.numel()


@torch.no_grad()
def evaluate(
    model: FPT,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device,
    bf16: bool,
    world: World | None = None,
) -> dict:
    """Held-out loss and accuracy (fraction of outputs right: the paper's figure for bit tasks).

    Under torchrun each rank scores a strided share and the sums are all-reduced: every rank gets the
    same figures.
    """
    world = world or World()
    if world.size > 1:
        inputs, labels = inputs[world.rank :: world.size], labels[world.rank :: world.size]
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        with autocast(device, bf16):
            logits = model(x)
        loss, c, n = loss_and_correct(logits, y)
        total_loss += float(loss) * n
        correct, count = correct + c, count + n
    model.train()
    total_loss, correct, count = all_reduce_sums([total_loss, correct, count], world)
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The lr for optimizer step ``step`` (0-based): a function of the step only, so resume needs no state.

    Cosine: linear warmup over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0.
    """
    if config.schedule == "constant":
        return config.lr
    warmup = min(config.warmup_steps, total_steps // 10)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


class TaskRun:
    """One task in training: its model (heads and norms around the shared body), data, optimizer, progress."""

    def __init__(self, config: TrainConfig, body, world: World, bf16: bool) -> None:
        self.config, self.world, self.device, self.bf16 = config, world, world.device, bf16
        self.task = task = get_task(config.task, max_positions=body.max_positions, **config.task_options)
        self.config = config = config.with_recipe(task.recipe)  # settings left unset follow the task's recipe
        if config.resume:
            _check_resumable(config, task)
        train_data = task.load_data("train", config.data_dir, config.download, seed=config.seed)
        test_data = task.load_data("test", config.data_dir, config.download, seed=0)
        x, y = torch.from_numpy(train_data.inputs), torch.from_numpy(train_data.labels)
        train_split, val_split = carve_validation(x, y, config.val_fraction, config.seed)
        (self.x_train, self.y_train), (self.x_val, self.y_val) = train_split, val_split
        self.x_test, self.y_test = torch.from_numpy(test_data.inputs), torch.from_numpy(test_data.labels)
        if not len(self.x_val):  # --val-fraction 0: the old, flattering choice on the test split
            log.warning("%s: no validation split; the best checkpoint is chosen on the test split", task.name)
            self.x_val, self.y_val = self.x_test, self.y_test
        self.splits = {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}
        log.info(
            "%s data: %s (train %d, validation %d carved with seed %d, test %d)",
            task.name,
            train_data.source,
            len(self.x_train),
            len(self.x_val) if config.val_fraction else 0,
            config.seed,
            len(self.x_test),
        )
        if config.augment:
            check_augmentable(task.spec.input_shape, task.name)

        torch.manual_seed(config.seed)  # the heads' init depends on the seed only, not on what ran before
        self.model = FPT(task, body, config.model).to(self.device)
        self.trainable, self.total = self.model.parameter_counts()
        log.info(
            "%s trainable parameters: %s of %s (%.3f%%)",
            task.name,
            f"{self.trainable:,}",
            f"{self.total:,}",
            100 * self.trainable / self.total,
        )
        self.forward = wrap_model(self.model, world)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=config.lr)

        self.steps_per_epoch = -(-len(self.x_train) // config.batch_size)
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.eval_every = config.eval_every or min(self.steps_per_epoch, self.total_steps)
        self.step, self.best, self.history = 0, -1.0, []
        self.best_test: dict = {}  # the test figures of the best (validation-chosen) checkpoint
        if config.resume:
            self.step, self.best, self.history, self.best_test = _restore(
                config, self.model, self.optimizer, self.device
            )
            log.info(
                "%s resumed from %s at step %d (best accuracy so far %.4f)",
                task.name,
                config.out / "last",
                self.step,
                self.best,
            )
        self.final = {"accuracy": self.best}
        self.meta = {
            "train_config": _jsonable(config),
            "trainable_params": self.trainable,
            "total_params": self.total,
            "splits": self.splits,
        }
        self.running = RunningSums()
        self.batches = self._global_batches()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def _global_batches(self) -> Iterator[torch.Tensor]:
        """Index batches from the current step on; the same on every rank and across a resume."""
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            yield from itertools.islice(
                _batches(len(self.x_train), self.config.batch_size, self.config.seed, epoch), offset, None
            )

    def train_step(self) -> None:
        """One optimizer step on the next global batch (this rank's share of it under torchrun)."""
        idx, weight = shard(next(self.batches), self.world)
        x, y = self.x_train[idx], self.y_train[idx]
        fresh = getattr(self.task, "fresh_batch", None)  # generated tasks that draw new examples every batch
        if fresh and (drawn := fresh(len(idx), self.config.seed, self.step, self.world.rank)) is not None:
            x, y = torch.from_numpy(drawn[0]), torch.from_numpy(drawn[1])
        if self.config.augment:
            x = augment_images(x, self.config.seed, self.step)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, self.bf16):
            logits = self.forward(x)
        loss, correct, count = loss_and_correct(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step, self.total_steps)
        self.optimizer.step()
        self.step += 1
        if weight:
            self.running.add(loss.item() * count, correct, count)
        if self.step % self.eval_every == 0 or self.step == self.total_steps:
            self.evaluate_and_save()

    def evaluate_and_save(self) -> None:
        """Validation and test evaluation; rank 0 writes ``best/`` when validation improved and always ``last/``.

        Only the validation accuracy chooses (best checkpoint, early stop); the test figures are recorded.
        """
        config = self.config
        args = (config.batch_size * 4, self.device, self.bf16, self.world)
        self.final = evaluate(self.model, self.x_val, self.y_val, *args)
        test = evaluate(self.model, self.x_test, self.y_test, *args)
        train, self.running = self.running.over_ranks(self.world), RunningSums()
        self.history.append(
            {
                "step": self.step,
                "train_loss": train.loss,
                "train_accuracy": train.accuracy,
                "val_loss": self.final["loss"],
                "val_accuracy": self.final["accuracy"],
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
            }
        )
        log.info(
            "%s step %d: validation accuracy %.4f (loss %.4f), test %.4f",
            self.task.name,
            self.step,
            self.final["accuracy"],
            self.final["loss"],
            test["accuracy"],
        )
        metrics = {
            "val_accuracy": self.final["accuracy"],
            "val_loss": self.final["loss"],
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "step": self.step,
            "chosen_on": "val" if config.val_fraction else "test",
        }
        improved = self.final["accuracy"] > self.best
        if improved:
            self.best, self.best_test = self.final["accuracy"], test
        if self.world.is_main:
            if improved:
                save_checkpoint(config.out / "best", self.model, self.task, config.backbone, metrics, self.meta)
            state = {
                "step": self.step,
                "best": self.best,
                "best_test": self.best_test,
                "history": self.history,
                "optimizer": self.optimizer.state_dict(),
            }
            save_checkpoint(
                config.out / "last", self.model, self.task, config.backbone, metrics, self.meta, trainer_state=state
            )
        if config.stop_at_accuracy is not None and self.final["accuracy"] >= config.stop_at_accuracy:
            self.total_steps = self.step

    def result(self, seconds: float) -> TrainResult:
        return TrainResult(
            task=self.task.name,
            best_accuracy=self.best,
            test_accuracy=self.best_test.get("accuracy"),
            final_accuracy=self.final["accuracy"],
            steps=self.step,
            seconds=seconds,
            checkpoint=self.config.out / "best",
            trainable_params=self.trainable,
            total_params=self.total,
            rank=self.world.rank,
        )


def carve_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x, y) to train on, (x, y) to validate on): a seeded random ``fraction`` of the training data."""
    n_val = round(len(x) * fraction) if fraction else 0
    n_val = min(max(n_val, 1 if fraction else 0), len(x) - 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 7919 + 17))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train], y[train]), (x[val], y[val])


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune the FPT parameters of ``config.task`` on ``config.backbone``; returns the best accuracy."""
    return run_job([config])[0]


def run_job(configs: list[TrainConfig]) -> list[TrainResult]:
    """Train every config's task against ONE frozen body, one step of each unfinished task in turn.

    The job-wide settings (backbone, device, bf16, backend, progress) come from the first config;
    ``training.multitask.train_multitask`` checks that the configs agree on them.
    """
    first = configs[0]
    world = init_world(first.device, first.dist_backend)
    ok = False
    with joined(world):
        try:
            bf16 = world.device.type == "cuda" if first.bf16 is None else first.bf16
            if bf16:
                warn_if_bf16_emulated(world.device.type)
            torch.manual_seed(first.seed)
            np.random.seed(first.seed)
            body = load_backbone(first.backbone)
            settings = [_jsonable(c, skip=("progress",)) for c in configs]
            try:
                check_ranks_agree(
                    "backbone fingerprint and settings",
                    json.dumps([body.fingerprint(), settings], sort_keys=True, default=str),
                    world,
                )
            except RanksDisagreeError:
                ok = True  # every rank raises here: leave the group together (a lone exit aborts gloo peers)
                raise
            runs = [TaskRun(config, body, world, bf16) for config in configs]
            start = time.perf_counter()
            _drive(runs, show=first.progress and world.is_main)
            seconds = time.perf_counter() - start
            ok = True
            return [run.result(seconds) for run in runs]
        finally:
            close_world(world, ok)


def _drive(runs: list[TaskRun], show: bool) -> None:
    """Step the runs round-robin until each is done (one run: the plain training loop)."""
    desc = f"train {runs[0].task.name}" if len(runs) == 1 else f"train {len(runs)} tasks"
    bar = tqdm(
        total=sum(r.total_steps for r in runs),
        initial=sum(r.step for r in runs),
        desc=desc,
        unit="step",
        disable=not show,
        dynamic_ncols=True,
    )
    with logging_redirect_tqdm() if show else nullcontext():
        while not all(run.done for run in runs):
            for run in runs:
                if run.done:
                    continue
                run.train_step()
                if show:
                    bar.total = sum(r.total_steps for r in runs)  # an early stop shortens the job
                    bar.update(1)
                    postfix = {"best": " ".join(f"{max(r.best, 0):.3f}" for r in runs)}
                    if run.running.outputs:
                        postfix = {"loss": f"{run.running.loss:.4f}", "acc": f"{run.running.accuracy:.3f}", **postfix}
                    bar.set_postfix(postfix)
    bar.close()


def _check_resumable(config: TrainConfig, task) -> None:
    """Fail before any data loads when ``--resume`` has nothing, or another task's state, to resume."""
    last = config.out / "last"
    if not (last / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"--resume: {last} has no saved training state; start without --resume")
    saved = read_checkpoint_config(last)
    if saved["task"] != task.name or saved["task_options"] != task.options:
        raise CheckpointError(
            f"--resume: {last} belongs to task {saved['task']} {saved['task_options']}, not this run; use another --out"
        )


def _restore(config: TrainConfig, model: FPT, optimizer, device) -> tuple[int, float, list, dict]:
    last = config.out / "last"
    restored, _, _ = load_checkpoint(last, backbone=config.backbone)
    model.load_state_dict(restored.trainable_state(), strict=False)
    state = torch.load(last / TRAINER_STATE_FILE, map_location=device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["best"], state["history"], state.get("best_test", {})


def _jsonable(config: TrainConfig, skip: tuple[str, ...] = ()) -> dict:
    def plain(v):
        return str(v) if isinstance(v, Path) else v.to_json() if isinstance(v, ModelOptions) else v

    return {k: plain(v) for k, v in vars(config).items() if k not in skip}


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    """Held-out loss and accuracy of a saved checkpoint: ``{"task", "examples", "loss", "accuracy"}``."""
    dev = resolve_device(config.device)
    model, task, ckpt = load_checkpoint(config.checkpoint)
    if config.split == "test":
        data = task.load_data("test", config.data_dir, config.download, seed=0)
        inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    else:  # the validation split the run carved, recomputed from its recorded seed and fraction
        saved = ckpt.get("train_config", {})
        seed, fraction = saved.get("seed", 0), saved.get("val_fraction", 0.0)
        if not fraction:
            raise CheckpointError(f"{config.checkpoint} was trained without a validation split; use --split test")
        data = task.load_data("train", config.data_dir, config.download, seed=seed)
        _, (inputs, labels) = carve_validation(
            torch.from_numpy(data.inputs), torch.from_numpy(data.labels), fraction, seed
        )
    result = evaluate(model.to(dev), inputs, labels, config.batch_size, dev, dev.type == "cuda")
    return {"task": task.name, "split": config.split, "examples": len(labels), **result}
