"""Shared head graphs: one input and one output graph per head SHAPE, each task's weights as table rows.

A task's heads differ from another task's of the same shape only in their weights: the input layer,
the positions and the output layer (its norms already are rows of the backbone's tables). So the
repository holds, per shape (docs/architecture.md, "Deployment repository")::

    heads/<key>/input.onnx    input (B, *raw), task_index (B,), tables (T, ...) -> hidden (B, L, D), mask (B, L)
    heads/<key>/output.onnx   last_hidden, attention_mask, task_index (B,), tables (T, ...) -> logits (B, *logits)
    tasks/<task>/heads.npz    the task's rows of those tables, one array per table name

and a server runs every task of a shape through the same two sessions, gathering each row's weights
by ``task_index`` inside the graph: loading a task adds rows, not sessions. The key is a hash of all
that shapes the graphs: the raw input, the preprocessing module (class, attributes, buffers), token
and output sizes, the hidden size and the opset. Preprocessing is parameter-free and determined by
the task's options, so it lives in the shared input graph; token-id tasks gather from a flattened
(T * V, D) embedding table.

Table names (rows in ``heads.npz``, graph inputs after ``task_index``):
    linear input layer:  embed_weight (F, D), embed_bias (D,), position (L, D)
    embedding input:     embed_table (V, D), position (L, D)
    output layer:        output_weight (D, O*C), output_bias (O*C,)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from fpt_deploy.export.onnx_workarounds import EXAMPLE_BATCH, export_onnx
from torch import nn

from fpt_deploy.artifacts import (
    HEAD_ROWS_FILE,
    HEAD_TASK_INDEX,
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    NORMS_FILE,
    OUTPUT_HEAD_INPUTS,
    OUTPUT_HEAD_OUTPUT,
    TASK_FILE,
    HeadsArtifact,
    Repository,
    TaskArtifact,
    graph_files,
    heads_dir,
    json_text,
    sha256_file,
    task_dir,
    write_head_rows,
    write_norm_rows,
)
from fpt_deploy.atomic import replace_dir
from fpt_deploy.errors import ArtifactError, ExportMismatchError

log = logging.getLogger(__name__)

BATCH, TASKS = "batch", "tasks"
LINEAR_TABLES = ("embed_weight", "embed_bias", "position")
EMBEDDING_TABLES = ("embed_table", "position")
OUTPUT_TABLES = ("output_weight", "output_bias")


class SharedLinearInput(nn.Module):
    """raw -> preprocessing -> per-row Linear and positions gathered by ``task_index``."""

    def __init__(self, preprocess: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess

    def forward(self, raw, task_index, embed_weight, embed_bias, position):
        x = self.preprocess(raw)  # (B, L, F)
        hidden = torch.bmm(x, embed_weight[task_index]) + embed_bias[task_index].unsqueeze(1)  # (B, L, D)
        hidden = hidden + position[task_index]  # (B, L, D)
        return hidden, torch.ones(x.shape[:2], dtype=torch.int64)


class SharedEmbeddingInput(nn.Module):
    """Token ids -> rows of the flattened (T * V, D) table at ``task_index * V + id``, plus positions."""

    def __init__(self, preprocess: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess

    def forward(self, raw, task_index, embed_table, position):
        ids = self.preprocess(raw)  # (B, L) int64
        vocab, d = embed_table.shape[1], embed_table.shape[2]
        flat = embed_table.reshape(-1, d)  # (T * V, D)
        hidden = flat[ids + task_index.unsqueeze(1) * vocab] + position[task_index]  # (B, L, D)
        return hidden, (ids != 0).long()  # id 0 is padding


class SharedOutput(nn.Module):
    """Reads the last ``read_tokens`` real tokens and applies each row's own output layer."""

    def __init__(self, read_tokens: int, logits_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.read_tokens, self.logits_shape = read_tokens, tuple(logits_shape)

    def forward(self, last_hidden, attention_mask, task_index, output_weight, output_bias):
        B, _, D = last_hidden.shape
        length = attention_mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens are a prefix
        idx = length - self.read_tokens + torch.arange(self.read_tokens)  # (B, k)
        read = last_hidden.gather(1, idx.unsqueeze(-1).expand(B, self.read_tokens, D))  # (B, k, D)
        logits = torch.bmm(read, output_weight[task_index]) + output_bias[task_index].unsqueeze(1)  # (B, k, O*C)
        return logits.reshape(B, *self.logits_shape)


def head_rows(model: nn.Module) -> dict[str, np.ndarray]:
    """The task's rows of its shape's tables (float32, no task axis): what ``heads.npz`` holds."""

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    head = model.input_head
    rows = {"position": np32(head.position)}  # (L, D)
    if isinstance(head.embed, nn.Embedding):
        rows["embed_table"] = np32(head.embed.weight)  # (V, D)
    else:
        rows["embed_weight"] = np32(head.embed.weight.T)  # (F, D)
        rows["embed_bias"] = np32(head.embed.bias)  # (D,)
    rows["output_weight"] = np32(model.output_head.linear.weight.T)  # (D, O*C)
    rows["output_bias"] = np32(model.output_head.linear.bias)  # (O*C,)
    return rows


def _module_signature(module: nn.Module) -> dict:
    """What a parameter-free module computes: its class, plain attributes, tensors and children.

    An attribute that is neither plain data, a tensor nor a module (a callable, say) cannot be compared,
    so it is recorded as ``opaque``: ``head_signature`` then gives the task head graphs of its own.
    """
    plain = (bool, int, float, str, tuple, list, type(None))
    attributes, opaque = {}, []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, plain):
            attributes[k] = v
        elif isinstance(v, torch.Tensor):
            attributes[k] = v.tolist()
        else:
            opaque.append(k)
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "attributes": attributes,
        "buffers": {n: b.tolist() for n, b in module.named_buffers(recurse=False)},
        "children": {n: _module_signature(c) for n, c in module.named_children()},
        **({"opaque": opaque} if opaque else {}),
    }


def _has_opaque(signature: dict) -> bool:
    return bool(signature.get("opaque")) or any(_has_opaque(c) for c in signature["children"].values())


def head_signature(model: nn.Module, opset: int) -> dict:
    """Everything that shapes the task's head graphs; tasks with equal signatures share the graphs.

    A task whose preprocessing holds state that cannot be compared keeps graphs of its own (its name
    is part of the signature): sharing them could run another task's preprocessing.
    """
    spec = model.spec
    preprocess = _module_signature(model.input_head.preprocess)
    signature = {
        "input_shape": list(spec.input_shape),
        "input_dtype": spec.input_dtype,
        "seq_len": spec.seq_len,
        "token_dim": spec.token_dim,
        "vocab_size": spec.vocab_size,
        "read_tokens": spec.read_tokens,
        "outputs_per_token": spec.outputs_per_token,
        "num_classes": spec.num_classes,
        "hidden_size": int(model.input_head.position.shape[1]),
        "preprocess": preprocess,
        "opset": opset,
    }
    if _has_opaque(preprocess):
        signature["own_task"] = spec.name
    return signature


def head_key(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def _input_module(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    if model.spec.vocab_size:
        return SharedEmbeddingInput(model.input_head.preprocess), EMBEDDING_TABLES
    return SharedLinearInput(model.input_head.preprocess), LINEAR_TABLES


def _example_tables(rows: dict[str, np.ndarray], names: tuple[str, ...], tasks: int = 2) -> tuple[torch.Tensor, ...]:
    """(T, ...) tables for tracing and checks: row 0 random (never all equal rows), the task's rows after."""
    g = np.random.default_rng(0)
    out = []
    for n in names:
        table = np.stack([g.standard_normal(rows[n].shape).astype(np.float32)] + [rows[n]] * (tasks - 1))
        out.append(torch.from_numpy(table))
    return tuple(out)


def write_head_graphs(model: nn.Module, folder: Path, opset: int) -> tuple[Path, Path]:
    """Export the shared input and output graphs of ``model``'s head shape into ``folder``."""
    from fpt_deploy.export.graphs import example_raw_input

    folder.mkdir(parents=True, exist_ok=True)
    rows = head_rows(model)
    module, names = _input_module(model)
    raw = example_raw_input(model.spec)
    index = torch.tensor([1, 0] * (EXAMPLE_BATCH // 2) + [1] * (EXAMPLE_BATCH % 2), dtype=torch.int64)
    tables = _example_tables(rows, names)
    inputs = (INPUT_HEAD_INPUT, HEAD_TASK_INDEX, *names)
    axes = {INPUT_HEAD_INPUT: {0: BATCH}, HEAD_TASK_INDEX: {0: BATCH}} | {n: {0: TASKS} for n in names}
    axes |= {o: {0: BATCH} for o in INPUT_HEAD_OUTPUTS}
    files = graph_files(folder)
    input_path, output_path = Path(files["input"]), Path(files["output"])
    export_onnx(
        module,
        (raw, index, *tables),
        input_path,
        input_names=inputs,
        output_names=INPUT_HEAD_OUTPUTS,
        dynamic_axes=axes,
        opset=opset,
    )
    with torch.no_grad():
        hidden, mask = model.input_head(raw)  # (B, L, D), (B, L)
    out_module = SharedOutput(model.spec.read_tokens, model.spec.logits_shape)
    out_tables = _example_tables(rows, OUTPUT_TABLES)
    inputs = (*OUTPUT_HEAD_INPUTS, HEAD_TASK_INDEX, *OUTPUT_TABLES)
    axes = {"last_hidden": {0: BATCH, 1: "length"}, "attention_mask": {0: BATCH, 1: "length"}}
    axes |= {HEAD_TASK_INDEX: {0: BATCH}, OUTPUT_HEAD_OUTPUT: {0: BATCH}} | {n: {0: TASKS} for n in OUTPUT_TABLES}
    export_onnx(
        out_module,
        (hidden, mask, index, *out_tables),
        output_path,
        input_names=inputs,
        output_names=(OUTPUT_HEAD_OUTPUT,),
        dynamic_axes=axes,
        opset=opset,
    )
    return input_path, output_path


def ensure_head_graphs(repo: Repository, model: nn.Module, opset: int) -> tuple[HeadsArtifact, bool]:
    """The repository's shared graphs for ``model``'s head shape, exported when none verify yet.

    Returns the artifact (added to ``repo.heads``, inside the caller's ``manifest_update``) and whether files
    were written. Whether the graphs compute this task's heads is checked by ``check_shared_heads``.
    """
    signature = head_signature(model, opset)
    key = head_key(signature)
    existing = repo.heads.get(key)
    if existing is not None:
        try:
            existing.paths(repo.root)
            return existing, False
        except ArtifactError as e:
            log.warning("%s; exporting the head graphs of shape %s again", e, key)
    rel = heads_dir(key)
    files = graph_files(rel)
    replace_dir(repo.root / rel, lambda tmp: write_head_graphs(model, tmp, opset))  # both graphs, one swap
    artifact = HeadsArtifact(
        key=key,
        files=files,
        sha256={k: sha256_file(repo.root / f) for k, f in files.items()},
        signature=signature,
    )
    repo.heads[key] = artifact
    log.info("head shape %s: shared input and output graphs written to %s", key, repo.root / rel)
    return artifact, True


def check_shared_heads(
    name: str, model: nn.Module, heads: HeadsArtifact, root: Path, backbone, raw: np.ndarray, atol: float
) -> float:
    """Logits through the shared graphs (the task as row 1 of two-row tables) + backbone vs PyTorch."""
    from fpt_deploy.export.graphs import task_norms
    from fpt_deploy.export.validate import CHUNK, ort_session, run_backbone, torch_logits

    input_path, output_path = heads.paths(root)
    sin, sout = ort_session(input_path), ort_session(output_path)
    rows = head_rows(model)
    _, in_names = _input_module(model)
    in_tables = {n: t.numpy() for n, t in zip(in_names, _example_tables(rows, in_names), strict=True)}
    out_tables = {n: t.numpy() for n, t in zip(OUTPUT_TABLES, _example_tables(rows, OUTPUT_TABLES), strict=True)}
    weight, bias = task_norms(model)
    logits = []
    for i in range(0, len(raw), CHUNK):
        chunk = raw[i : i + CHUNK]
        index = np.ones(len(chunk), np.int64)  # row 1: this task; row 0 holds other weights
        hidden, mask = sin.run(None, {INPUT_HEAD_INPUT: chunk, HEAD_TASK_INDEX: index, **in_tables})
        norm_w, norm_b = (np.broadcast_to(t, (len(chunk), *t.shape)).copy() for t in (weight, bias))
        last = run_backbone(backbone, hidden, mask, norm_w, norm_b)
        feeds = {"last_hidden": last, "attention_mask": mask, HEAD_TASK_INDEX: index, **out_tables}
        logits.append(sout.run(None, feeds)[0])
    diff = float(np.abs(np.concatenate(logits) - torch_logits(model, raw)).max())
    if not np.isfinite(diff) or diff > atol:
        raise ExportMismatchError(
            f"task {name}: the shared head graphs of shape {heads.key} and PyTorch differ by up to {diff:.3g} "
            f"(> atol {atol:g}); nothing was written for it"
        )
    log.info("task %s through shared heads %s: max |ORT - PyTorch| = %.3g (atol %g)", name, heads.key, diff, atol)
    return diff


def write_task_rows(model: nn.Module, path: Path) -> None:
    """The task's ``heads.npz``: its rows of the shape's tables."""
    write_head_rows(path, head_rows(model))


def write_task_from_rows(
    repo: Repository, like: TaskArtifact, name: str, rows: dict[str, np.ndarray], norms: tuple[np.ndarray, np.ndarray]
) -> TaskArtifact:
    """Write task ``name`` of ``like``'s head shape from its weights alone (no per-task graphs, no check).

    For tasks whose weights come from elsewhere than a checkpoint: benchmarks and tests that load
    hundreds of tasks. The folder holds ``heads.npz``, ``norms.npz`` and ``task.json``; the task is
    added to ``repo.tasks`` (inside the caller's ``manifest_update``).
    """
    if not like.heads:
        raise ArtifactError(f"task {like.name!r} has no shared head graphs (format /1); re-export it first")
    rel = task_dir(name)
    files = {"heads": f"{rel}/{HEAD_ROWS_FILE}", "norms": f"{rel}/{NORMS_FILE}"}
    artifact = TaskArtifact(
        name=name,
        fingerprint=like.fingerprint,
        spec=dataclasses.replace(like.spec, name=name),
        input=dict(like.input),
        output=dict(like.output),
        labels=list(like.labels),
        files=files,
        sha256={},
        metrics={"export": {"from_rows_like": like.name}},
        heads=like.heads,
    )

    def fill(tmp: Path) -> None:  # the whole folder, task.json included, appears in one rename
        write_head_rows(tmp / HEAD_ROWS_FILE, rows)
        write_norm_rows(tmp / NORMS_FILE, *norms)
        artifact.sha256 = {k: sha256_file(tmp / Path(f).name) for k, f in files.items()}
        (tmp / TASK_FILE).write_text(json_text(artifact.to_json()))

    replace_dir(repo.root / rel, fill)
    repo.tasks[name] = artifact
    return artifact
