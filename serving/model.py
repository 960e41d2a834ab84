"""A deployment repository loaded for serving: one backbone runtime, norm tables, head tables by shape.

A task is rows, not sessions: one row in each norm table (T, N_norm, D) that the backbone runtime
gathers by task index, and one row in each table of its head shape (``serving.heads.SharedHeads``:
two sessions per shape, whatever the number of tasks). ``ServingModel.add_task`` is the one way a
task is loaded, at start-up and while serving; ``remove_task`` stops its requests, waits for the
queued and running ones to finish, and frees its rows. A task of format /1 brings its own two head
sessions (``serving.heads.OwnHeads``).

With ``max_resident_tasks`` set, at most that many tasks hold rows at once. Every task is loaded
(checked, listed, served) and its rows written once to disk (``serving.paging.RowSpill``). A task
whose rows were dropped to make room, least recently used first, reads them back from there when its
next batch runs (``ServingModel.page_in``, called by the executor before each batch, on the one thread
that runs batches). Memory then stays bounded whatever the number of tasks; a miss costs one read.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fpt_deploy.serving.config import RuntimeConfig
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.heads import OwnHeads, RowTables, SharedHeads
from fpt_deploy.serving.paging import RowSpill
from fpt_deploy.serving.protocol import triton_dtype
from fpt_deploy.serving.runtimes import Runtime, runtime_class

from fpt_deploy.artifacts import (
    INPUT_HEAD_INPUT,
    OUTPUT_HEAD_OUTPUT,
    TaskArtifact,
    open_repository,
    verify_file,
)
from fpt_deploy.errors import ArtifactError, ConfigError, FingerprintMismatchError, UnknownNameError

log = logging.getLogger(__name__)

NORM_TABLES = ("weight", "bias")  # the norm RowTables' names, each (T, N_norm, D)
NORM_WEIGHT, NORM_BIAS = "norm:weight", "norm:bias"  # a task's norms among its spilled rows (no head table name)


@dataclass(eq=False)
class LoadedTask:
    """One task's per-process state: its rows (norms, heads), its I/O contract, its requests in flight."""

    name: str
    index: int  # row of this task in the runtime's norm tables; -1 while its rows are not resident
    input_name: str  # what a client calls the raw input tensor
    input_dtype: np.dtype
    example_shape: tuple[int, ...]  # one raw example, no batch dim
    output_name: str  # the logits tensor
    logits_shape: tuple[int, ...]  # logits of one example
    vocab_size: int  # > 0: the input holds token ids in [0, vocab_size)
    labels: list[str]
    heads: SharedHeads | OwnHeads  # the sessions that run this task's heads
    slot: int  # row of this task in its heads' tables; -1 while its rows are not resident
    pad_id: int = 0  # the raw id that pads token rows (a declared tokens task may choose another)
    pending: int = 0  # requests queued or running
    unloading: bool = False  # remove_task began: no new requests
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def resident(self) -> bool:
        return self.index >= 0

    def run_input_head(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, L, D) float32, (n, L) int64: this task alone (the executor batches tasks of a shape)."""
        return self.heads.run_input(raw, np.full(len(raw), self.slot, np.int64))

    def run_output_head(self, last_hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.heads.run_output(last_hidden, attention_mask, np.full(len(last_hidden), self.slot, np.int64))

    def begin_request(self) -> None:
        """Count a request in (the batcher calls this on submit); refused once the task is unloading."""
        with self._cond:
            if self.unloading:
                raise UnknownNameError(f"model {self.name!r} is being unloaded and takes no new requests")
            self.pending += 1

    def end_request(self, _future=None) -> None:
        """Count a request out (its future is done: answered, failed or cancelled)."""
        with self._cond:
            self.pending -= 1
            if self.pending == 0:
                self._cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        """Refuse new requests and wait until none is queued or running; False when ``timeout`` passed first."""
        with self._cond:
            self.unloading = True
            return self._cond.wait_for(lambda: self.pending == 0, timeout)

    def describe_input(self) -> str:
        return f"{triton_dtype(self.input_dtype)} [-1, {', '.join(map(str, self.example_shape))}]"

    def check_input(self, name: str, array: np.ndarray, max_rows: int) -> np.ndarray:
        """``array`` if it is a valid batch of raw inputs for this task, else ``InvalidInputError``."""
        where = f"input {name!r} of model {self.name!r}"
        if name != self.input_name:
            raise InvalidInputError(
                f"model {self.name!r} has one input, {self.input_name!r} ({self.describe_input()}); got {name!r}"
            )
        if array.dtype != self.input_dtype:
            raise InvalidInputError(
                f"{where} must be {triton_dtype(self.input_dtype)}, got {triton_dtype(array.dtype)}"
            )
        if array.ndim != 1 + len(self.example_shape) or tuple(array.shape[1:]) != self.example_shape:
            raise InvalidInputError(
                f"{where} must have shape {self.describe_input().split(' ', 1)[1]}, got {list(array.shape)}"
            )
        if not 1 <= array.shape[0] <= max_rows:
            raise InvalidInputError(
                f"{where} must have between 1 and {max_rows} rows (max batch size), "
                f"got {array.shape[0]}; split the request"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInputError(f"{where} contains NaN or inf")
        if self.vocab_size and array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise InvalidInputError(
                f"{where} holds token ids that must lie in [0, {self.vocab_size}), "
                f"got values in [{array.min()}, {array.max()}]"
            )
        if self.vocab_size:
            real = array.reshape(len(array), -1) != self.pad_id
            if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
                raise InvalidInputError(
                    f"{where}: each row needs at least one token, and padding (id {self.pad_id}) only after "
                    "the last token"
                )
        return array


class ServingModel:
    """Every task of a repository (or the ``tasks`` named) around one shared backbone runtime.

    ``tasks=None`` loads every task (of the ``--fingerprint`` body, when one is named); an empty list
    loads none (Triton's explicit mode without ``--load-model``): the body is then the one named by
    ``--fingerprint``, or the repository's only one, and tasks come later through ``add_task``.
    """

    def __init__(
        self, config: RuntimeConfig, tasks: list[str] | None = None, *, max_resident_tasks: int | None = None
    ) -> None:
        repo = open_repository(config.repo)
        wanted = sorted(repo.tasks) if tasks is None else list(tasks)
        if tasks is None and not wanted:
            raise ArtifactError(f"{repo.root} holds no tasks; export one with `fpt-deploy export`")
        for name in wanted:
            repo.task(name)  # UnknownNameError naming the tasks it has
        self.backbone = repo.find_backbone(config.fingerprint, wanted)
        if config.fingerprint and tasks is None:  # serve the tasks of the chosen backbone, leave the others
            wanted = [t for t in wanted if repo.tasks[t].fingerprint == self.backbone.fingerprint]
            if not wanted:
                raise ArtifactError(f"{repo.root} holds no task on backbone {self.backbone.fingerprint[:16]}")
        self.repository = repo
        self.config = config
        self.tasks: dict[str, LoadedTask] = {}
        self.heads: dict[str, SharedHeads | OwnHeads] = {}  # by head-shape key ("task:<name>" for format /1)
        self.max_resident_tasks = max_resident_tasks  # None: every task's rows stay in memory
        self._spill = None if max_resident_tasks is None else RowSpill(repo.root)  # every task's rows, on disk
        self._resident: OrderedDict[str, LoadedTask] = OrderedDict()  # tasks holding rows, least recent first
        norm_row = (self.backbone.num_norms, self.backbone.hidden_size)
        self._norms = RowTables(dict.fromkeys(NORM_TABLES, norm_row), capacity=self._resident_bound(len(wanted)))
        self._shape_counts = Counter(repo.tasks[t].heads for t in wanted if repo.tasks[t].heads)  # table sizes
        self._lock = threading.RLock()  # add_task / remove_task / page_in, one at a time
        self.runtime: Runtime | None = None
        for name in wanted:
            self._load(repo.tasks[name])
        runtime = runtime_class(config.runtime)
        backbone_file = (
            Path(config.engine)
            if config.engine
            else runtime.backbone_file(self.backbone, repo.root, config.backbone_variant)
        )
        tables = self._norms.arrays
        self.runtime = runtime.from_config(backbone_file, tables["weight"], tables["bias"], config)
        try:  # an engine built for smaller batches, shorter rows or fewer tasks is refused now, not per request
            self.runtime.check_capacity(
                max_batch_size=config.max_batch_size, seq_lens={t: repo.tasks[t].spec.seq_len for t in self.tasks}
            )
        except BaseException:
            self.runtime.close()
            raise
        self.variant = config.backbone_variant
        shared = sum(1 for h in self.heads.values() if h.shared)
        log.info(
            "loaded %d task(s) on backbone %s (%s, %s): %d shared head shape(s), %d task(s) with their own heads%s",
            len(self.tasks),
            self.backbone.name,
            self.backbone.fingerprint[:16],
            config.runtime,
            shared,
            len(self.heads) - shared,
            "" if max_resident_tasks is None else f"; rows of at most {max_resident_tasks} in memory",
        )
        _return_freed_memory()

    def _resident_bound(self, tasks: int) -> int:
        return tasks if self.max_resident_tasks is None else min(tasks, self.max_resident_tasks)

    # ------------------------------------------------------------------------------- loading tasks

    def add_task(self, name: str) -> LoadedTask:
        """Load task ``name`` from the repository as it is on disk now: rows in its tables, no new session
        unless its head shape is new here. The task serves from the next batch on."""
        with self._lock:
            if name in self.tasks:
                raise ConfigError(f"model {name!r} is already loaded; unload it first to load another version")
            repo = open_repository(self.repository.root)  # exports since start-up are visible
            art = repo.task(name)
            self.repository = repo
            task = self._load(art)
            self._publish_norms()
            where = f"norm row {task.index}" if task.resident else "rows read on its first request"
            log.info("task %s loaded (%s, head shape %s)", name, where, task.heads.key)
        _return_freed_memory()
        return task

    def remove_task(self, name: str, timeout: float | None = 30.0) -> None:
        """Unload ``name``: new requests are refused at once, queued and running ones finish, then its
        rows are freed (and its head sessions, when it was the last task of its shape).

        Raises ``TimeoutError`` (the task stays loaded but refuses requests) when they do not finish
        within ``timeout`` seconds.
        """
        task = self.task(name)
        if not task.drain(timeout):
            raise TimeoutError(
                f"model {name!r} still has {task.pending} request(s) after {timeout}s; it takes no new ones, "
                "retry the unload later"
            )
        with self._lock:
            if self.tasks.get(name) is not task:
                return  # another remove_task finished it
            del self.tasks[name]
            if task.resident:
                self._evict(task)
            if self._spill is not None:
                self._spill.drop(name)
            if not any(t.heads is task.heads for t in self.tasks.values()):
                del self.heads[task.heads.key]
            self._publish_norms()
        log.info("task %s unloaded", name)

    def _load(self, art: TaskArtifact) -> LoadedTask:
        """Read ``art``'s files, take its rows (and sessions for a new shape), and list it in ``tasks``."""
        root = self.repository.root
        if art.fingerprint != self.backbone.fingerprint:
            raise FingerprintMismatchError(
                f"task {art.name!r} was trained on backbone {art.fingerprint[:16]}, "
                f"not the served {self.backbone.fingerprint[:16]}; re-export it"
            )
        weight, bias = art.load_norms(root)
        expected = (self.backbone.num_norms, self.backbone.hidden_size)
        if weight.shape != expected or bias.shape != expected:
            raise ArtifactError(f"norms of task {art.name!r} have shape {weight.shape}, the backbone needs {expected}")
        try:
            input_dtype = np.dtype(art.input["dtype"])
        except TypeError as e:
            raise ArtifactError(f"task {art.name!r} declares an unknown input dtype {art.input.get('dtype')!r}") from e
        heads, rows = self._heads_for(art)
        heads.check_rows(rows, f"task {art.name!r}")
        task = LoadedTask(
            name=art.name,
            index=-1,
            input_name=art.input.get("name", INPUT_HEAD_INPUT),
            input_dtype=input_dtype,
            example_shape=tuple(int(s) for s in art.input["shape"][1:]),
            output_name=art.output.get("name", OUTPUT_HEAD_OUTPUT),
            logits_shape=art.spec.logits_shape,
            vocab_size=art.spec.vocab_size,
            labels=list(art.labels),
            heads=heads,
            slot=-1,
            pad_id=int(art.spec.options.get("pad_id", 0)) if art.spec.vocab_size else 0,
        )
        if self._spill is not None:
            self._spill.put(art.name, {NORM_WEIGHT: weight, NORM_BIAS: bias} | rows)
        if self.max_resident_tasks is None or len(self._resident) < self.max_resident_tasks:
            self._take_rows(task, weight, bias, rows)
        self.tasks[art.name] = task
        return task

    # ------------------------------------------------------------------------ rows in memory (LRU)

    def page_in(self, tasks: Iterable[LoadedTask]) -> int:
        """Make every one of ``tasks`` (one batch's) hold its rows, evicting the least recently used
        others when ``max_resident_tasks`` are already in memory; returns how many were read back.
        Called by the thread that runs batches, before each one."""
        if self.max_resident_tasks is None:
            return 0
        batch = {id(t): t for t in tasks}
        with self._lock:
            missing = []
            for task in batch.values():
                if task.resident:
                    self._resident.move_to_end(task.name)
                else:
                    missing.append(task)
            if not missing:
                return 0
            for task in missing:  # loaded: remove_task waits for a task's batches before it drops the task
                while len(self._resident) >= self.max_resident_tasks:
                    victim = next((t for t in self._resident.values() if id(t) not in batch), None)
                    if victim is None:  # cannot happen: config checks max_resident_tasks >= max_batch_size
                        raise ConfigError(
                            f"a batch holds more than {self.max_resident_tasks} tasks (--max-resident-tasks)"
                        )
                    self._evict(victim)
                rows = self._spill.get(task.name)
                self._take_rows(task, rows.pop(NORM_WEIGHT), rows.pop(NORM_BIAS), rows)
            self._publish_norms()
            return len(missing)

    def _take_rows(self, task: LoadedTask, weight: np.ndarray, bias: np.ndarray, rows: dict) -> None:
        what = f"task {task.name!r}"
        task.slot = task.heads.add(rows, what)
        task.index = self._norms.add({"weight": weight, "bias": bias}, what)
        self._resident[task.name] = task

    def _evict(self, task: LoadedTask) -> None:
        """Free ``task``'s rows (it stays loaded; ``page_in`` reads them again)."""
        task.heads.remove(task.slot)
        self._norms.free(task.index)
        task.index = task.slot = -1
        del self._resident[task.name]

    @property
    def resident_tasks(self) -> int:
        return len(self._resident)

    def _heads_for(self, art: TaskArtifact) -> tuple[SharedHeads | OwnHeads, dict[str, np.ndarray]]:
        """The sessions that run ``art``'s heads (made for its shape's first task) and its rows of them."""
        root = self.repository.root
        if not art.heads:  # format /1: the task's own graphs
            paths = [verify_file(root, art.files[k], art.sha256[k]) for k in ("input", "output")]
            heads = self.heads[f"task:{art.name}"] = OwnHeads(f"task:{art.name}", *paths)
            return heads, {}
        rows = art.load_head_rows(root)
        if art.heads not in self.heads:
            if art.heads not in self.repository.heads:
                raise ArtifactError(
                    f"task {art.name!r} uses head graphs {art.heads} that {root} does not list; "
                    "re-run `fpt-deploy export`"
                )
            paths = self.repository.heads[art.heads].paths(root)
            self.heads[art.heads] = SharedHeads(
                art.heads, *paths, capacity=self._resident_bound(self._shape_counts.get(art.heads, 1))
            )
        return self.heads[art.heads], rows

    def _publish_norms(self) -> None:
        """Hand the (possibly grown) norm tables to the runtime; a running batch keeps the ones it read."""
        tables = self._norms.arrays
        self.runtime.set_norm_tables(tables["weight"], tables["bias"])

    # -------------------------------------------------------------------------------------- access

    def task(self, name: str) -> LoadedTask:
        task = self.tasks.get(name)
        if task is None:
            raise UnknownNameError(f"model {name!r} is not served here; models: {', '.join(self.tasks)}")
        return task

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        if self._spill is not None:
            self._spill.close()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading a task reads its files into buffers that are freed at once, but between long-lived objects,
    so the heap keeps their pages: about 30 KB a task, 30 MB for a thousand tasks, measured with
    MNIST-shaped tasks. Called after loading, never per request.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
