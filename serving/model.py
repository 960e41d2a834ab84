"""A deployment repository loaded for serving: one backbone runtime, the norm tables, every task's heads.

Loading happens once. Each task then costs two one-thread head sessions and one row in each norm
table (T, N_norm, D); nothing per request grows with the number of loaded tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fpt_deploy.serving.config import RuntimeConfig
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.protocol import triton_dtype
from fpt_deploy.serving.runtimes import Runtime, runtime_class
from fpt_deploy.serving.runtimes.sessions import create_head_session

from fpt_deploy.artifacts import (
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    OUTPUT_HEAD_INPUTS,
    OUTPUT_HEAD_OUTPUT,
    BackboneArtifact,
    Repository,
    TaskArtifact,
    open_repository,
    verify_file,
)
from fpt_deploy.errors import ArtifactError, FingerprintMismatchError

log = logging.getLogger(__name__)


@dataclass
class LoadedTask:
    """One task's per-process state: its heads, its row in the norm tables, and its I/O contract."""

    name: str
    index: int  # row of this task in the runtime's norm tables
    input_name: str  # what a client calls the raw input tensor
    input_dtype: np.dtype
    example_shape: tuple[int, ...]  # one raw example, no batch dim
    output_name: str  # the logits tensor
    logits_shape: tuple[int, ...]  # logits of one example
    vocab_size: int  # > 0: the input holds token ids in [0, vocab_size)
    labels: list[str]
    input_session: object  # onnxruntime.InferenceSession: raw -> hidden, attention_mask
    output_session: object  # onnxruntime.InferenceSession: last_hidden, attention_mask -> logits

    def run_input_head(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden, mask = self.input_session.run(list(INPUT_HEAD_OUTPUTS), {INPUT_HEAD_INPUT: raw})
        return hidden, mask  # (n, L, D) float32, (n, L) int64

    def run_output_head(self, last_hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = dict(zip(OUTPUT_HEAD_INPUTS, (last_hidden, attention_mask), strict=True))
        return self.output_session.run([OUTPUT_HEAD_OUTPUT], feeds)[0]  # (n, *logits_shape)

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
            real = array.reshape(len(array), -1) != 0  # token id 0 is padding
            if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
                raise InvalidInputError(
                    f"{where}: each row needs at least one token, and padding (id 0) only after the last token"
                )
        return array


def _load_task(repo: Repository, art: TaskArtifact, index: int, backbone: BackboneArtifact) -> tuple:
    root = repo.root
    if art.fingerprint != backbone.fingerprint:
        raise FingerprintMismatchError(
            f"task {art.name!r} was trained on backbone {art.fingerprint[:16]}, "
            f"not the served {backbone.fingerprint[:16]}; re-export it"
        )
    weight, bias = art.load_norms(root)
    expected = (backbone.num_norms, backbone.hidden_size)
    if weight.shape != expected or bias.shape != expected:
        raise ArtifactError(f"norms of task {art.name!r} have shape {weight.shape}, the backbone needs {expected}")
    try:
        input_dtype = np.dtype(art.input["dtype"])
    except TypeError as e:
        raise ArtifactError(f"task {art.name!r} declares an unknown input dtype {art.input.get('dtype')!r}") from e
    task = LoadedTask(
        name=art.name,
        index=index,
        input_name=art.input.get("name", INPUT_HEAD_INPUT),
        input_dtype=input_dtype,
        example_shape=tuple(int(s) for s in art.input["shape"][1:]),
        output_name=art.output.get("name", OUTPUT_HEAD_OUTPUT),
        logits_shape=art.spec.logits_shape,
        vocab_size=art.spec.vocab_size,
        labels=list(art.labels),
        input_session=create_head_session(verify_file(root, art.files["input"], art.sha256["input"])),
        output_session=create_head_session(verify_file(root, art.files["output"], art.sha256["output"])),
    )
    return task, weight, bias


class ServingModel:
    """Every task of a repository (or the ``tasks`` named) around one shared backbone runtime."""

    def __init__(self, config: RuntimeConfig, tasks: list[str] | None = None) -> None:
        repo = open_repository(config.repo)
        wanted = list(tasks) if tasks else sorted(repo.tasks)
        if not wanted:
            raise ArtifactError(f"{repo.root} holds no tasks; export one with `fpt-deploy export`")
        for name in wanted:
            repo.task(name)  # UnknownNameError naming the tasks it has
        self.backbone = repo.find_backbone(config.fingerprint, wanted)
        if config.fingerprint and not tasks:  # serve the tasks of the chosen backbone, leave the others
            wanted = [t for t in wanted if repo.tasks[t].fingerprint == self.backbone.fingerprint]
            if not wanted:
                raise ArtifactError(f"{repo.root} holds no task on backbone {self.backbone.fingerprint[:16]}")
        self.repository = repo
        self.tasks: dict[str, LoadedTask] = {}
        weights, biases = [], []
        for index, name in enumerate(wanted):
            task, w, b = _load_task(repo, repo.tasks[name], index, self.backbone)
            self.tasks[name] = task
            weights.append(w)
            biases.append(b)
        runtime = runtime_class(config.runtime)
        backbone_file = (
            Path(config.engine)
            if config.engine
            else runtime.backbone_file(self.backbone, repo.root, config.backbone_variant)
        )
        self.runtime: Runtime = runtime(backbone_file, np.stack(weights), np.stack(biases), threads=config.threads)
        self.variant = config.backbone_variant
        log.info(
            "loaded %d task(s) on backbone %s (%s, %s): %s",
            len(self.tasks),
            self.backbone.name,
            self.backbone.fingerprint[:16],
            config.runtime,
            ", ".join(self.tasks),
        )

    def task(self, name: str) -> LoadedTask:
        from fpt_deploy.errors import UnknownNameError

        if name not in self.tasks:
            raise UnknownNameError(f"model {name!r} is not served here; models: {', '.join(self.tasks)}")
        return self.tasks[name]

    def close(self) -> None:
        self.runtime.close()
