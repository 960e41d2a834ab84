"""The deployment repository: its layout, its JSON formats, and validated reading. Torch-free.

``export/`` writes repositories with the helpers here; ``serving/`` reads them with ``open_repository``.
Layout (docs/architecture.md, "Deployment repository")::

    manifest.json                       backbones by fingerprint, tasks by name
    backbones/<fp16>/backbone.onnx      the frozen body, once per fingerprint
    backbones/<fp16>/backbone.int8.onnx optional variants (quantized, ...)
    heads/<key>/input.onnx              shared by every task of one head shape (format /2, export/heads.py):
    heads/<key>/output.onnx               the task's weights are inputs, gathered by task_index
    tasks/<task>/heads.npz              the task's rows of its shape's head tables (format /2)
    tasks/<task>/input.onnx             raw input -> hidden (B, L, D), attention_mask (B, L)
    tasks/<task>/output.onnx            last_hidden, attention_mask -> logits
    tasks/<task>/norms.npz              norm_weight, norm_bias (N_norm, D) float32
    tasks/<task>/task.json              what a client sends and gets back, fingerprint, checksums

Every file is written atomically and listed with its sha256, so a reader either sees a complete,
verified repository or gets an ``ArtifactError`` that names the broken file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpt_deploy.atomic import write_text
from fpt_deploy.errors import ArtifactError, ConfigError, FingerprintMismatchError, UnknownNameError
from fpt_deploy.taskspec import TaskSpec

REPOSITORY_FORMAT = "fpt-deploy-repository/2"
TASK_FORMAT = "fpt-deploy-task/2"
# Formats this version reads. /1 tasks have no shared head graphs: a server runs their own
# input.onnx / output.onnx (two sessions a task); re-exporting upgrades them to /2.
READABLE_REPOSITORY_FORMATS = ("fpt-deploy-repository/1", REPOSITORY_FORMAT)
READABLE_TASK_FORMATS = ("fpt-deploy-task/1", TASK_FORMAT)

# The repository's file names: every writer and reader builds paths with these (layout above).
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"  # taken by every writer of the manifest (``repository_lock``)
LOCK_TIMEOUT_S = 600.0  # a writer waits this long for another one to finish
TASKS_DIR, BACKBONES_DIR, HEADS_DIR = "tasks", "backbones", "heads"
TASK_FILE = "task.json"
INPUT_GRAPH, OUTPUT_GRAPH = "input.onnx", "output.onnx"  # a task's own graphs, and a head shape's shared ones
NORMS_FILE = "norms.npz"
HEAD_ROWS_FILE = "heads.npz"  # the task's rows of its shape's shared head tables (export/heads.py)
FP32 = "fp32"  # the backbone variant every repository holds; others are written beside it

# Graph I/O names: the contract between export and serving (docs/architecture.md, "Backbone contract").
BACKBONE_INPUTS = ("hidden", "attention_mask", "norm_weight", "norm_bias")
BACKBONE_OUTPUT = "last_hidden"
INPUT_HEAD_INPUT = "input"
INPUT_HEAD_OUTPUTS = ("hidden", "attention_mask")
OUTPUT_HEAD_INPUTS = ("last_hidden", "attention_mask")
OUTPUT_HEAD_OUTPUT = "logits"
# The backbone wrapped with a Gather by task index from resident norm tables (TensorRT engines):
# inputs hidden, attention_mask, task_index (B,) int64, norm_table_weight/bias (T, N_norm, D).
TASK_INDEX_INPUT = "task_index"
NORM_TABLE_INPUTS = ("norm_table_weight", "norm_table_bias")
# Shared head graphs take the row's task index among the tables of their shape (export/heads.py).
HEAD_TASK_INDEX = TASK_INDEX_INPUT


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def backbone_dir(fingerprint: str) -> str:
    return f"{BACKBONES_DIR}/{fingerprint[:16]}"


def backbone_file(fingerprint: str, variant: str = FP32) -> str:
    """``backbones/<fp16>/backbone.onnx``, or ``backbone.<variant>.onnx`` for another variant."""
    suffix = "" if variant == FP32 else f".{variant}"
    return f"{backbone_dir(fingerprint)}/backbone{suffix}.onnx"


def task_dir(task: str) -> str:
    return f"{TASKS_DIR}/{task}"


def task_file(task: str) -> str:
    return f"{task_dir(task)}/{TASK_FILE}"


def heads_dir(key: str) -> str:
    return f"{HEADS_DIR}/{key}"


def graph_files(folder: str | Path) -> dict[str, str]:
    """The ``input`` and ``output`` graph paths of a task's or a head shape's folder, by kind."""
    return {"input": f"{folder}/{INPUT_GRAPH}", "output": f"{folder}/{OUTPUT_GRAPH}"}


def write_head_rows(path: Path, rows: dict[str, np.ndarray]) -> None:
    """A task's ``heads.npz``: its rows of the head tables, one float32 array per table name."""
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
        np.savez(f, **{name: np.ascontiguousarray(a, dtype=np.float32) for name, a in rows.items()})


def write_norm_rows(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """A task's ``norms.npz``: its norm scales and biases, (N_norm, D) float32 each."""
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
        np.savez(f, norm_weight=weight.astype(np.float32), norm_bias=bias.astype(np.float32))


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{what} {path} is missing; re-run `fpt-deploy export`") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is corrupt ({e}); re-run `fpt-deploy export`") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {path} is not a JSON object; re-run `fpt-deploy export`")
    return data


def json_text(data: dict) -> str:
    """How the repository writes JSON (sorted keys, indented): equal data, equal text."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, data: dict) -> None:
    write_text(path, json_text(data))


def verify_file(root: Path, rel: str, sha256: str) -> Path:
    """The path of ``rel`` under ``root`` after checking it exists and matches its recorded checksum."""
    path = root / rel
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-run `fpt-deploy export`")
    if sha256_file(path) != sha256:
        raise ArtifactError(f"{path} is corrupt or truncated (checksum mismatch); re-run `fpt-deploy export`")
    return path


@dataclass(kw_only=True)
class BackboneArtifact:
    """One exported body: its files by variant, and the shapes its norm inputs take."""

    fingerprint: str
    name: str  # registry name it was exported from
    hidden_size: int
    num_norms: int
    norm_names: list[str]
    files: dict[str, str]  # variant ("fp32", "int8", ...) -> path relative to the repository
    sha256: dict[str, str]  # variant -> checksum
    opset: int
    extra: dict = field(default_factory=dict)  # e.g. quantization report

    def path(self, root: Path, variant: str = FP32) -> Path:
        if variant not in self.files:
            raise ArtifactError(
                f"backbone {self.fingerprint[:16]} has no {variant!r} variant "
                f"(has {', '.join(self.files)}); export it first"
            )
        return verify_file(root, self.files[variant], self.sha256[variant])


@dataclass(kw_only=True)
class HeadsArtifact:
    """The shared input and output graphs of one head shape (``heads/<key>/``, export/heads.py)."""

    key: str
    files: dict[str, str]  # "input", "output" -> path relative to the repository
    sha256: dict[str, str]
    signature: dict = field(default_factory=dict)  # what shapes the graphs (for people reading the manifest)

    def paths(self, root: Path) -> tuple[Path, Path]:
        """The verified (input, output) graph files."""
        return tuple(verify_file(root, self.files[k], self.sha256[k]) for k in ("input", "output"))


@dataclass(kw_only=True)
class TaskArtifact:
    """One exported task: its spec, what a client sends and gets back, its files (``task.json``)."""

    name: str
    fingerprint: str
    spec: TaskSpec
    input: dict  # {"name", "shape" (with -1 batch), "dtype"}: what a client sends
    output: dict  # {"name", "shape", "dtype"}: what it gets back
    labels: list[str]
    files: dict[str, str]  # "input", "output", "norms", "heads" -> path relative to the repository
    sha256: dict[str, str]
    metrics: dict = field(default_factory=dict)
    heads: str = ""  # key of the shared head graphs (format /2); "" for a /1 task with its own graphs

    def to_json(self) -> dict:
        return {"format": TASK_FORMAT, **self.__dict__, "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> TaskArtifact:
        if data.get("format") not in READABLE_TASK_FORMATS:
            raise ArtifactError(f"{where} is not an fpt-deploy task file (format {data.get('format')!r})")
        values = {k: v for k, v in data.items() if k != "format"}
        try:
            values["spec"] = TaskSpec.from_json(values["spec"])
            return cls(**values)
        except (KeyError, TypeError, AttributeError, ConfigError) as e:
            raise ArtifactError(
                f"{where} does not have the fields of a task file ({e}); re-run `fpt-deploy export`"
            ) from e

    def load_norms(self, root: Path) -> tuple[np.ndarray, np.ndarray]:
        path = verify_file(root, self.files["norms"], self.sha256["norms"])
        try:
            with np.load(path) as z:
                return z["norm_weight"].astype(np.float32), z["norm_bias"].astype(np.float32)
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path} is not a valid norms file ({e}); re-run `fpt-deploy export`") from e

    def load_head_rows(self, root: Path) -> dict[str, np.ndarray]:
        """The task's rows of its head shape's tables (``heads.npz``), by table name."""
        path = verify_file(root, self.files["heads"], self.sha256["heads"])
        try:
            with np.load(path) as z:
                return {name: z[name].astype(np.float32) for name in z.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not a valid heads file ({e}); re-run `fpt-deploy export`") from e


@dataclass(kw_only=True)
class Repository:
    """A verified view of a deployment repository (what ``serving/`` loads)."""

    root: Path
    backbones: dict[str, BackboneArtifact] = field(default_factory=dict)  # by fingerprint
    tasks: dict[str, TaskArtifact] = field(default_factory=dict)  # by name
    heads: dict[str, HeadsArtifact] = field(default_factory=dict)  # shared head graphs by key
    unreadable: dict[str, str] = field(default_factory=dict)  # listed tasks whose task file was refused: why

    def task(self, name: str) -> TaskArtifact:
        if name in self.unreadable:
            raise ArtifactError(self.unreadable[name])
        if name not in self.tasks:
            raise UnknownNameError(f"task {name!r} is not in {self.root}; it has {', '.join(sorted(self.tasks))}")
        return self.tasks[name]

    def backbone_for(self, task: str) -> BackboneArtifact:
        fp = self.task(task).fingerprint
        if fp not in self.backbones:
            raise FingerprintMismatchError(f"task {task!r} needs backbone {fp[:16]}, which {self.root} lacks")
        return self.backbones[fp]

    def find_backbone(self, fingerprint: str | None = None, tasks: list[str] | None = None) -> BackboneArtifact:
        """The one backbone to run: the only one whose fingerprint starts with ``fingerprint``.

        Without a ``fingerprint``, the one backbone that ``tasks`` (default: every task) were trained
        on; a repository that holds no task yet offers its only backbone. Every caller that chooses a
        backbone by fingerprint prefix (``serve``/``predict``'s ``--fingerprint``, ``build-engine``)
        calls this, so the rule and its errors are written once.
        """
        if not self.backbones:
            raise ArtifactError(f"{self.root} holds no backbone; run `fpt-deploy export` first")
        known = ", ".join(fp[:16] for fp in sorted(self.backbones))
        if fingerprint:
            matches = [b for fp, b in self.backbones.items() if fp.startswith(fingerprint)]
            if len(matches) != 1:
                raise ConfigError(
                    f"fingerprint {fingerprint!r} matches {len(matches)} of the backbones of {self.root} "
                    f"({known}); pass a prefix of exactly one"
                )
            return matches[0]
        names = sorted(self.tasks) if tasks is None else tasks
        used = sorted({self.task(t).fingerprint for t in names}) if names else sorted(self.backbones)
        if len(used) != 1:
            raise ConfigError(
                f"{self.root} holds {len(used)} backbones ({', '.join(fp[:16] for fp in used)}); "
                "one runtime session runs one: pass --fingerprint with a prefix of one"
            )
        if used[0] not in self.backbones:
            raise FingerprintMismatchError(f"the tasks need backbone {used[0][:16]}, which {self.root} lacks")
        return self.backbones[used[0]]

    def to_manifest(self) -> dict:
        return {
            "format": REPOSITORY_FORMAT,
            "backbones": {
                fp: {k: v for k, v in b.__dict__.items() if k != "fingerprint"} for fp, b in self.backbones.items()
            },
            "tasks": {name: {"file": task_file(name), "fingerprint": t.fingerprint} for name, t in self.tasks.items()},
            "heads": {key: {k: v for k, v in h.__dict__.items() if k != "key"} for key, h in self.heads.items()},
        }

    def save_manifest(self) -> None:
        write_json(self.root / MANIFEST, self.to_manifest())


def open_repository(root: str | Path, *, create: bool = False, skip_unreadable: bool = False) -> Repository:
    """Read and check ``root/manifest.json`` and every task file it lists.

    File checksums are verified when a file is loaded (``BackboneArtifact.path``, ``verify_file``).
    With ``create``, a missing repository is returned empty (for exporters). With ``skip_unreadable``
    (a server), a task file that cannot be read is that task's problem, not the repository's: it is
    left out of ``tasks`` and its error kept in ``unreadable``.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        if create:
            return Repository(root=root)
        raise ArtifactError(f"{root} is not a deployment repository (no {MANIFEST}); run `fpt-deploy export` first")
    manifest = read_json(root / MANIFEST, "manifest")
    if manifest.get("format") not in READABLE_REPOSITORY_FORMATS:
        raise ArtifactError(
            f"{root / MANIFEST} has format {manifest.get('format')!r}; this version reads "
            f"{', '.join(READABLE_REPOSITORY_FORMATS)}: upgrade fpt-deploy"
        )
    try:
        backbones = {fp: BackboneArtifact(fingerprint=fp, **b) for fp, b in manifest["backbones"].items()}
        heads = {key: HeadsArtifact(key=key, **h) for key, h in manifest.get("heads", {}).items()}  # /1: none
        tasks, unreadable = {}, {}
        for name, entry in manifest["tasks"].items():
            where = root / entry["file"]
            try:
                tasks[name] = TaskArtifact.from_json(read_json(where, "task file"), where)
            except ArtifactError as e:
                if not skip_unreadable:
                    raise
                unreadable[name] = f"task {name!r}: {e}"
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{root / MANIFEST} is malformed ({e}); re-run `fpt-deploy export`") from e
    return Repository(root=root, backbones=backbones, tasks=tasks, heads=heads, unreadable=unreadable)


@contextmanager
def repository_lock(root: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the repository's exclusive lock: every read-modify-write of its manifest happens inside one.

    Two exports adding different tasks would otherwise each read the manifest, add their own task and
    write it back, and the later write would drop the earlier task. The lock is an OS file lock
    (``filelock``), so a killed writer releases it; readers never take it, since the manifest is
    always replaced in one rename.
    """
    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ArtifactError(
            f"{root} stayed locked by another writer for {timeout:.0f}s ({root / LOCK}); "
            "wait for the other `fpt-deploy export` to finish, then run this one again"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def manifest_update(root: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Repository]:
    """One repository transaction: lock, re-read the manifest, let the block change it, write it once.

    The block gets the repository as the manifest on disk lists it now (empty when there is none), so
    what it adds keeps every other writer's entries. The manifest is replaced in one atomic rename when
    the block ends normally and changed something; when the block raises, the manifest on disk is left
    as it was. Files the block writes must be complete before it ends: the manifest makes them visible.
    """
    with repository_lock(root, timeout):
        repo = open_repository(root, create=True)
        # As text, not a dict: to_manifest shares the artifacts' dicts, which the block may change in place.
        before = json_text(repo.to_manifest()) if (repo.root / MANIFEST).is_file() else None
        yield repo
        if json_text(repo.to_manifest()) != before:
            repo.save_manifest()
