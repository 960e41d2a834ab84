"""The three graphs of a deployment, declared (names, dynamic axes) and written from a PyTorch FPT.

    input.onnx     input (B, *raw shape)                        -> hidden (B, L, D), attention_mask (B, L)
    backbone.onnx  hidden, attention_mask, norm_weight, norm_bias -> last_hidden (B, L, D)
    output.onnx    last_hidden (B, L, D), attention_mask (B, L)   -> logits (B, *logits shape)

Names come from ``fpt_deploy.artifacts`` (the contract with ``serving/``). These functions only write
files; ``export.exporter`` decides where, validates, and records checksums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fpt_deploy.export.onnx_workarounds import EXAMPLE_BATCH, export_onnx
from torch import nn

from fpt_deploy.artifacts import (
    BACKBONE_INPUTS,
    BACKBONE_OUTPUT,
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    NORMS_FILE,
    OUTPUT_HEAD_INPUTS,
    OUTPUT_HEAD_OUTPUT,
    graph_files,
    write_norm_rows,
)

BATCH, LENGTH = "batch", "length"


@dataclass(frozen=True)
class GraphSpec:
    """What one exported graph looks like from outside: its I/O names and which axes are dynamic."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


BACKBONE_GRAPH = GraphSpec(
    BACKBONE_INPUTS,
    (BACKBONE_OUTPUT,),
    {
        "hidden": {0: BATCH, 1: LENGTH},
        "attention_mask": {0: BATCH, 1: LENGTH},
        "norm_weight": {0: BATCH},
        "norm_bias": {0: BATCH},
        BACKBONE_OUTPUT: {0: BATCH, 1: LENGTH},
    },
)
# A task's raw input has a fixed shape (TaskSpec.input_shape), so only its batch axis is dynamic.
INPUT_HEAD_GRAPH = GraphSpec(
    (INPUT_HEAD_INPUT,),
    INPUT_HEAD_OUTPUTS,
    {INPUT_HEAD_INPUT: {0: BATCH}, "hidden": {0: BATCH}, "attention_mask": {0: BATCH}},
)
OUTPUT_HEAD_GRAPH = GraphSpec(
    OUTPUT_HEAD_INPUTS,
    (OUTPUT_HEAD_OUTPUT,),
    {"last_hidden": {0: BATCH, 1: LENGTH}, "attention_mask": {0: BATCH, 1: LENGTH}, OUTPUT_HEAD_OUTPUT: {0: BATCH}},
)


@dataclass(frozen=True)
class TaskGraphs:
    """Where ``write_task_graphs`` put one task's files."""

    input: Path
    output: Path
    norms: Path


def _write(module: nn.Module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    export_onnx(
        module,
        args,
        path,
        input_names=spec.inputs,
        output_names=spec.outputs,
        dynamic_axes=spec.dynamic_axes,
        opset=opset,
    )


def example_raw_input(spec, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """A valid raw input batch for a task, as a client would send it.

    Ones, not zeros: 0 is the padding id of token tasks, and an all-padding row has no token to read.
    """
    return torch.from_numpy(np.ones((batch, *spec.input_shape), dtype=spec.input_dtype))


def write_backbone_graph(body: nn.Module, path: Path, opset: int) -> None:
    """Export the frozen body with per-row norm inputs (docs/architecture.md, "Backbone contract")."""
    d, n = body.hidden_size, body.num_norms
    b, length = EXAMPLE_BATCH, 3
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(b, length, d, generator=g),  # (B, L, D)
        torch.ones(b, length, dtype=torch.int64),  # (B, L)
        torch.randn(b, n, d, generator=g),  # (B, N_norm, D): random, so no value can be folded in
        torch.randn(b, n, d, generator=g),
    )
    _write(body, args, BACKBONE_GRAPH, path, opset)  # portable: each runtime rewrites it for itself at load


def write_input_head_graph(model: nn.Module, path: Path, opset: int) -> None:
    """Export raw input -> preprocessing -> input layer + positions -> (hidden, attention_mask)."""
    _write(model.input_head, (example_raw_input(model.spec),), INPUT_HEAD_GRAPH, path, opset)


def write_output_head_graph(model: nn.Module, path: Path, opset: int) -> None:
    """Export (last_hidden, attention_mask) -> logits: reads the last real token(s), then the Linear."""
    with torch.no_grad():
        hidden, mask = model.input_head(example_raw_input(model.spec))  # (B, L, D), (B, L)
    _write(model.output_head, (hidden, mask), OUTPUT_HEAD_GRAPH, path, opset)


def task_norms(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The task's norm scales and biases, (N_norm, D) float32 each: what the backbone takes per row."""
    return (
        model.norm_weight.detach().float().cpu().numpy().copy(),
        model.norm_bias.detach().float().cpu().numpy().copy(),
    )


def write_norms(model: nn.Module, path: Path) -> None:
    write_norm_rows(path, *task_norms(model))


def write_task_graphs(model: nn.Module, folder: Path, opset: int) -> TaskGraphs:
    """Write a task's ``input.onnx``, ``output.onnx`` and ``norms.npz`` into ``folder`` (no validation).

    For writers of other layouts (Triton): the deployment repository itself is written by
    ``export.export_task``, which stages these files, validates them and swaps them in atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = graph_files(folder)
    graphs = TaskGraphs(Path(files["input"]), Path(files["output"]), folder / NORMS_FILE)
    write_input_head_graph(model, graphs.input, opset)
    write_output_head_graph(model, graphs.output, opset)
    write_norms(model, graphs.norms)
    return graphs
