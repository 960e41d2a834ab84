"""A deployment repository loaded for serving: one backbone runtime, norm tables, head tables by shape.

A task is rows, not sessions: one row in each norm table (T, N_norm, D) that the backbone runtime
gathers by task index, and one row in each table of its head shape (``serving.heads.SharedHeads``:
two sessions per shape, whatever the number of tasks). A task of format /1 brings its own two head
sessions (``serving.heads.OwnHeads``).

Each task is in one ``TaskState`` at a time: LOADING, READY (served), UNLOADING (refusing new
requests while its queued and running ones finish) or UNAVAILABLE (not served, with the reason).
``ServingModel.add_task`` is the one way a task is loaded, at start-up and while serving, and the one
way it is reloaded when its task file changed; ``remove_task`` unloads it. Each is all or nothing:
a load that fails leaves what was served before (and records why, for the repository index); an
unload whose requests do not finish in time leaves the task READY, never half unloaded. A task file
that does not hold a valid contract is an ``ArtifactError`` naming what is wrong, for that task only.

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
from enum import StrEnum
from pathlib import Path

import numpy as np
from fpt_deploy.serving.config import RuntimeConfig
from fpt_deploy.serving.errors import InvalidInputError, UnloadTimeoutError
from fpt_deploy.serving.heads import OwnHeads, RowTables, SharedHeads
from fpt_deploy.serving.paging import RowSpill
from fpt_deploy.serving.protocol import NUMPY_TO_TRITON, triton_dtype
from fpt_deploy.serving.runtimes import Runtime, runtime_class

from fpt_deploy.artifacts import (
    INPUT_HEAD_INPUT,
    OUTPUT_HEAD_OUTPUT,
    Repository,
    TaskArtifact,
    open_repository,
    verify_file,
)
from fpt_deploy.errors import (
    ArtifactError,
    ConfigError,
    FingerprintMismatchError,
    FptDeployError,
    RuntimeUnavailableError,
    UnknownNameError,
)

log = logging.getLogger(__name__)

NORM_TABLES = ("weight", "bias")  # the norm RowTables' names, each (T, N_norm, D)
NORM_WEIGHT, NORM_BIAS = "norm:weight", "norm:bias"  # a task's norms among its spilled rows (no head table name)
UNLOAD_TIMEOUT_S = 30.0  # how long an unload waits for a task's queued and running requests


class TaskState(StrEnum):
    """Where a task is on this server; the names are the states Triton's repository index reports."""

    LOADING = "LOADING"  # its files are being read and its rows taken: not served yet
    READY = "READY"  # served
    UNLOADING = "UNLOADING"  # refuses new requests while its queued and running ones finish
    UNAVAILABLE = "UNAVAILABLE"  # not served: never loaded, unloaded, or its load failed


_REFUSALS = {
    TaskState.LOADING: "is still loading",
    TaskState.UNLOADING: "is being unloaded",
    TaskState.UNAVAILABLE: "was unloaded",
}


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
    source: dict = field(default_factory=dict, repr=False)  # the task file it was loaded from (reloads compare)
    state: TaskState = TaskState.LOADING  # READY once listed in ``ServingModel.tasks``
    pending: int = 0  # requests queued or running
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def resident(self) -> bool:
        return self.index >= 0

    @property
    def unloading(self) -> bool:
        return self.state is TaskState.UNLOADING

    def refusal(self) -> str:
        """Why a task that is not READY takes no request."""
        return f"model {self.name!r} {_REFUSALS.get(self.state, 'is not ready')} and takes no new requests"

    def run_input_head(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, L, D) float32, (n, L) int64: this task alone (the executor batches tasks of a shape)."""
        return self.heads.run_input(raw, np.full(len(raw), self.slot, np.int64))

    def run_output_head(self, last_hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.heads.run_output(last_hidden, attention_mask, np.full(len(last_hidden), self.slot, np.int64))

    def begin_request(self) -> None:
        """Count a request in (the batcher calls this on submit); refused unless the task is READY."""
        with self._cond:
            if self.state is not TaskState.READY:
                raise UnknownNameError(self.refusal())
            self.pending += 1

    def end_request(self, _future=None) -> None:
        """Count a request out (its future is done: answered, failed or cancelled)."""
        with self._cond:
            self.pending -= 1
            if self.pending == 0:
                self._cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        """Refuse new requests and wait until none is queued or running.

        True: drained, and the task is UNAVAILABLE for good. False: ``timeout`` passed first, and the
        task is READY again, serving its remaining requests and new ones: never refusing them forever.
        """
        with self._cond:
            self.state = TaskState.UNLOADING
            if self._cond.wait_for(lambda: self.pending == 0, timeout):
                self.state = TaskState.UNAVAILABLE
                return True
            self.state = TaskState.READY
            return False

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


@dataclass(eq=False)
class _TaskFiles:
    """One task's files read and checked, before it takes anything of the server's (``ServingModel._read``)."""

    art: TaskArtifact
    input_name: str
    input_dtype: np.dtype
    example_shape: tuple[int, ...]
    output_name: str
    labels: list[str]
    pad_id: int
    weight: np.ndarray  # (N_norm, D)
    bias: np.ndarray
    rows: dict[str, np.ndarray]  # its rows of its head shape's tables (format /2); {} for format /1
    own_graphs: tuple[Path, Path] | None  # format /1: its verified input and output graphs


class ServingModel:
    """Every task of a repository (or the ``tasks`` named) around one shared backbone runtime.

    ``tasks=None`` loads every task (of the ``--fingerprint`` body, when one is named); a task among
    them whose files are broken is left UNAVAILABLE with its reason and the others are served, as
    Triton does at start-up. Tasks named in ``tasks`` must all load. An empty list loads none
    (Triton's explicit mode without ``--load-model``): the body is then the one named by
    ``--fingerprint``, or the repository's only one, and tasks come later through ``add_task``.
    """

    def __init__(
        self, config: RuntimeConfig, tasks: list[str] | None = None, *, max_resident_tasks: int | None = None
    ) -> None:
        repo = open_repository(config.repo, skip_unreadable=True)
        every = tasks is None
        wanted = sorted(repo.tasks) if every else list(tasks)
        if every and not wanted:
            unreadable = "".join(f"; {reason}" for reason in repo.unreadable.values())
            raise ArtifactError(
                f"{repo.root} holds no task that can be read{unreadable}; export one with `fpt-deploy export`"
            )
        for name in wanted:
            repo.task(name)  # UnknownNameError naming the tasks it has; ArtifactError for a broken task file
        self.backbone = repo.find_backbone(config.fingerprint, wanted)
        if config.fingerprint and every:  # serve the tasks of the chosen backbone, leave the others
            wanted = [t for t in wanted if repo.tasks[t].fingerprint == self.backbone.fingerprint]
            if not wanted:
                raise ArtifactError(f"{repo.root} holds no task on backbone {self.backbone.fingerprint[:16]}")
        self.repository = repo
        self.config = config
        self.tasks: dict[str, LoadedTask] = {}  # READY or UNLOADING
        self.heads: dict[str, SharedHeads | OwnHeads] = {}  # by head-shape key ("task:<name>" for format /1)
        self.max_resident_tasks = max_resident_tasks  # None: every task's rows stay in memory
        self._spill = None if max_resident_tasks is None else RowSpill(repo.root)  # every task's rows, on disk
        self._resident: OrderedDict[str, LoadedTask] = OrderedDict()  # tasks holding rows, least recent first
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}  # task -> why its last load failed (UNAVAILABLE's reason)
        norm_row = (self.backbone.num_norms, self.backbone.hidden_size)
        self._norms = RowTables(dict.fromkeys(NORM_TABLES, norm_row), capacity=self._resident_bound(len(wanted)))
        keys = (repo.tasks[t].heads for t in wanted)
        self._shape_counts = Counter(k for k in keys if k and isinstance(k, str))  # table sizes
        self._lock = threading.RLock()  # add_task / remove_task / page_in, one at a time
        self.runtime: Runtime | None = None
        if every:
            for name, reason in repo.unreadable.items():
                self._fail(name, reason)
        for name in wanted:
            try:
                self._install(self._read(repo.tasks[name], repo))
            except RuntimeUnavailableError:
                raise  # the machine lacks a runtime package: no task can be served, say so once
            except FptDeployError as e:
                if not every:
                    raise
                self._fail(name, str(e))
        if wanted and not self.tasks:
            raise ArtifactError(f"none of the tasks of {repo.root} can be served: {'; '.join(self._failed.values())}")
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

    def state_of(self, name: str) -> tuple[TaskState, str]:
        """``name``'s state here and, when UNAVAILABLE after a failed load, why ("" otherwise)."""
        task = self.tasks.get(name)
        if task is not None:
            return task.state, ""
        if name in self._loading:
            return TaskState.LOADING, ""
        return TaskState.UNAVAILABLE, self._failed.get(name, "")

    def add_task(self, name: str, timeout: float | None = UNLOAD_TIMEOUT_S) -> LoadedTask:
        """Load task ``name`` as the repository holds it now; it serves from the next batch on.

        Rows go into its tables, and no new session is made unless its head shape is new here. When
        ``name`` is loaded already: unchanged (the same task file), that task is returned; changed, the
        new version is read and checked first, then the old one unloaded (``remove_task``, waiting up
        to ``timeout``) and the new one put in its place. A failure leaves what was served before, when
        it comes before the old version is unloaded; it is recorded as the task's UNAVAILABLE reason.
        """
        repo = open_repository(self.repository.root, skip_unreadable=True)  # exports since start-up are visible
        if name not in repo.tasks and name not in repo.unreadable:
            repo.task(name)  # UnknownNameError naming the tasks it has; nothing recorded for unlisted names
        old = self.tasks.get(name)
        self._loading.add(name)
        try:
            art = repo.task(name)  # ArtifactError for a task file that cannot be read
            if old is not None and old.source == art.to_json():
                return old
            files = self._read(art, repo)
            if old is not None:
                self.remove_task(name, timeout)  # UnloadTimeoutError: the old version keeps serving
            with self._lock:
                self.repository = repo
                task = self._install(files)
        except FptDeployError as e:
            self._fail(name, str(e))
            raise
        finally:
            self._loading.discard(name)
        self._failed.pop(name, None)
        where = f"norm row {task.index}" if task.resident else "rows read on its first request"
        log.info("task %s %s (%s, head shape %s)", name, "reloaded" if old else "loaded", where, task.heads.key)
        _return_freed_memory()
        return task

    def remove_task(self, name: str, timeout: float | None = UNLOAD_TIMEOUT_S) -> None:
        """Unload ``name``: new requests are refused at once, queued and running ones finish, then its
        rows are freed (and its head sessions, when it was the last task of its shape).

        Raises ``UnloadTimeoutError`` when they do not finish within ``timeout`` seconds; the task is
        then READY again, as it was before the call.
        """
        task = self.tasks.get(name)
        if task is None:
            raise UnknownNameError(f"model {name!r} is not served here; models: {', '.join(self.tasks)}")
        if not task.drain(timeout):
            raise UnloadTimeoutError(
                f"model {name!r} still had {task.pending} request(s) queued or running after {timeout:g}s, "
                "so it was not unloaded and keeps serving; retry once they finish"
            )
        with self._lock:
            if self.tasks.get(name) is not task:
                return  # another remove_task finished it
            self._discard(task)
        self._failed.pop(name, None)
        log.info("task %s unloaded", name)

    def _fail(self, name: str, reason: str) -> None:
        if self._failed.get(name) != reason:  # a poller retrying the same broken file logs it once
            log.error("load of task %s failed: %s", name, reason)
        self._failed[name] = reason

    def _read(self, art: TaskArtifact, repo: Repository) -> _TaskFiles:
        """``art``'s files read and checked against the served body; nothing of the server's is touched.

        A task file whose fields do not hold what serving needs is an ``ArtifactError`` that names the
        task, never another exception.
        """
        try:
            return self._read_checked(art, repo)
        except FptDeployError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(
                f"task {art.name!r}: its task file does not hold what serving needs ({type(e).__name__}: {e}); "
                "re-run `fpt-deploy export` for it"
            ) from e

    def _read_checked(self, art: TaskArtifact, repo: Repository) -> _TaskFiles:
        root = repo.root
        if art.fingerprint != self.backbone.fingerprint:
            raise FingerprintMismatchError(
                f"task {art.name!r} was trained on backbone {art.fingerprint[:16]}, but this server runs "
                f"{self.backbone.fingerprint[:16]}; serve it from a server of that body, or train it on this one"
            )
        contract = _contract(art)
        weight, bias = art.load_norms(root)
        expected = (self.backbone.num_norms, self.backbone.hidden_size)
        if weight.shape != expected or bias.shape != expected:
            raise ArtifactError(f"norms of task {art.name!r} have shape {weight.shape}, the backbone needs {expected}")
        if not art.heads:  # format /1: the task's own graphs
            graphs = tuple(verify_file(root, art.files[k], art.sha256[k]) for k in ("input", "output"))
            return _TaskFiles(art=art, **contract, weight=weight, bias=bias, rows={}, own_graphs=graphs)
        if not isinstance(art.heads, str) or art.heads not in repo.heads:
            raise ArtifactError(
                f"task {art.name!r} uses head graphs {art.heads!r} that {root} does not list; "
                "re-run `fpt-deploy export`"
            )
        rows = art.load_head_rows(root)
        return _TaskFiles(art=art, **contract, weight=weight, bias=bias, rows=rows, own_graphs=None)

    def _install(self, files: _TaskFiles) -> LoadedTask:
        """Take ``files``' rows (and sessions for a new shape), list the task READY, publish the tables.
        All or nothing: a failure takes back what it took."""
        art = files.art
        with self._lock:
            try:
                heads = self._heads_for(files)
                heads.check_rows(files.rows, f"task {art.name!r}")
                task = LoadedTask(
                    name=art.name,
                    index=-1,
                    input_name=files.input_name,
                    input_dtype=files.input_dtype,
                    example_shape=files.example_shape,
                    output_name=files.output_name,
                    logits_shape=art.spec.logits_shape,
                    vocab_size=art.spec.vocab_size,
                    labels=files.labels,
                    heads=heads,
                    slot=-1,
                    pad_id=files.pad_id,
                    source=art.to_json(),
                )
                if self._spill is not None:
                    self._spill.put(art.name, {NORM_WEIGHT: files.weight, NORM_BIAS: files.bias} | files.rows)
                if self.max_resident_tasks is None or len(self._resident) < self.max_resident_tasks:
                    self._take_rows(task, files.weight, files.bias, files.rows)
                task.state = TaskState.READY
                self.tasks[art.name] = task
            except BaseException:
                self._drop_unused_heads()
                raise
            try:
                self._publish_norms()
            except BaseException:  # the runtime refused the tables (an engine's --max-tasks): take the task back
                self._discard(task, publish=False)
                raise
        return task

    def _discard(self, task: LoadedTask, *, publish: bool = True) -> None:
        """Unlist ``task`` and free what it holds (rows, spilled rows, its shape's sessions when last)."""
        task.state = TaskState.UNAVAILABLE
        del self.tasks[task.name]
        if task.resident:
            self._evict(task)
        if self._spill is not None:
            self._spill.drop(task.name)
        self._drop_unused_heads()
        if publish:
            self._publish_norms()

    def _drop_unused_heads(self) -> None:
        used = {id(t.heads) for t in self.tasks.values()}
        for key in [k for k, h in self.heads.items() if id(h) not in used]:
            del self.heads[key]

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

    def _heads_for(self, files: _TaskFiles) -> SharedHeads | OwnHeads:
        """The sessions that run the task's heads: its own (format /1), or its shape's, made for the first."""
        art = files.art
        if files.own_graphs is not None:
            key = f"task:{art.name}"
            heads = self.heads[key] = OwnHeads(key, *files.own_graphs)
            return heads
        if art.heads not in self.heads:
            paths = self.repository.heads[art.heads].paths(self.repository.root)
            self.heads[art.heads] = SharedHeads(
                art.heads, *paths, capacity=self._resident_bound(self._shape_counts.get(art.heads, 1))
            )
        return self.heads[art.heads]

    def _publish_norms(self) -> None:
        """Hand the (possibly grown) norm tables to the runtime; a running batch keeps the ones it read."""
        if self.runtime is None:  # start-up: the runtime is made with the tables of every task loaded
            return
        tables = self._norms.arrays
        self.runtime.set_norm_tables(tables["weight"], tables["bias"])

    # -------------------------------------------------------------------------------------- access

    def is_ready(self, name: str) -> bool:
        task = self.tasks.get(name)
        return task is not None and task.state is TaskState.READY

    def task(self, name: str) -> LoadedTask:
        """The READY task ``name``; ``UnknownNameError`` for any other (a 404 that says why)."""
        task = self.tasks.get(name)
        if task is None:
            raise UnknownNameError(f"model {name!r} is not served here; models: {', '.join(self.tasks)}")
        if task.state is not TaskState.READY:
            raise UnknownNameError(task.refusal())
        return task

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        if self._spill is not None:
            self._spill.close()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading a task reads its files into buffers that are freed at once, but between long-lived objects,
    so the heap keeps their pages, and they add up with the number of tasks. Called after loading,
    never per request.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def _contract(art: TaskArtifact) -> dict:
    """What ``art``'s task file says a client sends and gets back, checked field by field against its spec.

    ``ArtifactError`` names the first field that is wrong, so a hand-edited or damaged task file is
    that task's clear refusal, never a failure of the server or of other tasks.
    """
    where = f"task {art.name!r}: task.json"
    spec = art.spec
    if not isinstance(art.input, dict) or not isinstance(art.output, dict):
        raise ArtifactError(f"{where} must hold 'input' and 'output' objects; re-run `fpt-deploy export` for it")
    shape = art.input.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[:1] != [-1]
        or tuple(shape[1:]) != spec.input_shape
    ):
        raise ArtifactError(
            f"{where} has input shape {shape!r}; its spec takes {[-1, *spec.input_shape]} (-1: the batch). "
            "Re-run `fpt-deploy export` for it"
        )
    dtype = art.input.get("dtype")
    try:
        input_dtype = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        input_dtype = None
    if input_dtype is None or input_dtype not in NUMPY_TO_TRITON or input_dtype != np.dtype(spec.input_dtype):
        raise ArtifactError(
            f"{where} has input dtype {dtype!r}; its spec takes {spec.input_dtype!r}. Re-run `fpt-deploy export` for it"
        )
    names = {
        "input name": art.input.get("name", INPUT_HEAD_INPUT),
        "output name": art.output.get("name", OUTPUT_HEAD_OUTPUT),
    }
    for what, value in names.items():
        if not isinstance(value, str) or not value:
            raise ArtifactError(f"{where} has {what} {value!r}; a tensor name is a non-empty string")
    labels = art.labels
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ArtifactError(f"{where} has labels {labels!r}; they are a list of strings")
    return {
        "input_name": names["input name"],
        "input_dtype": input_dtype,
        "example_shape": tuple(shape[1:]),
        "output_name": names["output name"],
        "labels": list(labels),
        "pad_id": int(spec.options.get("pad_id", 0)) if spec.vocab_size else 0,
    }
