"""Serving fixtures.

``synthetic_repo`` is a deployment repository of tiny hand-built ONNX graphs (no torch, instant to
make) in the exact format export writes, with three tasks that exercise what the batcher must handle:

- ``vec``  float32 input (B, 4, 3): 4 tokens, every token real;
- ``vec2`` the same shapes, other weights: mixes with ``vec`` in one backbone call;
- ``tok``  int64 token ids (B, 6), 0 = padding: rows of different real lengths.

Its backbone mixes tokens (a masked mean over the sequence), so a padding bug changes the answers.
``exported_repo`` (tests/conftest.py) is a real one: the tiny mnist and bit-xor checkpoints, exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

D, N_NORM = 8, 2


def _save(model, path: Path) -> str:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _masked_mean_nodes(x: str, mask: str, out: str, keepdims: int) -> list:
    """Nodes computing out = sum(x * mask, axis 1) / sum(mask, axis 1) for x (B, L, D), mask (B, L) int64."""
    from onnx import TensorProto, helper

    p = out + "_"
    return [
        helper.make_node("Cast", [mask], [p + "mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mf", "axis2"], [p + "m3"]),
        helper.make_node("Mul", [x, p + "m3"], [p + "xm"]),
        helper.make_node("ReduceSum", [p + "xm", "axis1"], [p + "s"], keepdims=keepdims),
        helper.make_node("ReduceSum", [p + "m3", "axis1"], [p + "c"], keepdims=keepdims),
        helper.make_node("Div", [p + "s", p + "c"], [out]),
    ]


def _axes():
    from onnx import numpy_helper

    return [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]


def build_backbone(path: Path) -> str:
    """last = tanh(hidden * w0 + b0 + masked_mean(hidden)) * w1 + b1, per-row norm params w, b (B, 2, D)."""
    from onnx import TensorProto, helper, numpy_helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    consts = _axes() + [
        numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("one", 1), ("two", 2))
    ]
    nodes = _masked_mean_nodes("hidden", "attention_mask", "mean", keepdims=1)
    for k, (lo, hi) in enumerate((("zero", "one"), ("one", "two"))):
        nodes += [helper.make_node("Slice", [t, lo, hi, "axis1"], [f"{t}{k}"]) for t in ("norm_weight", "norm_bias")]
    nodes += [
        helper.make_node("Mul", ["hidden", "norm_weight0"], ["hw"]),
        helper.make_node("Add", ["hw", "norm_bias0"], ["hwb"]),
        helper.make_node("Add", ["hwb", "mean"], ["x"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Mul", ["t", "norm_weight1"], ["tw"]),
        helper.make_node("Add", ["tw", "norm_bias1"], ["last_hidden"]),
    ]
    inputs = [
        helper.make_tensor_value_info("hidden", f, ["B", "L", D]),
        helper.make_tensor_value_info("attention_mask", i64, ["B", "L"]),
        helper.make_tensor_value_info("norm_weight", f, ["B", N_NORM, D]),
        helper.make_tensor_value_info("norm_bias", f, ["B", N_NORM, D]),
    ]
    outputs = [helper.make_tensor_value_info("last_hidden", f, ["B", "L", D])]
    return _save(_model(nodes, inputs, outputs, consts), path)


def build_input_head(path: Path, rng, kind: str, seq: int, width: int) -> str:
    """float: (B, seq, width) @ W + pos, mask all ones; ids: Embedding(ids) + pos, mask = ids != 0."""
    from onnx import TensorProto, helper, numpy_helper

    pos = numpy_helper.from_array(rng.standard_normal((seq, D)).astype(np.float32), "pos")
    weight = numpy_helper.from_array(rng.standard_normal((width, D)).astype(np.float32), "W")
    consts = [
        pos,
        weight,
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array(0, np.int64), "pad"),
    ]
    if kind == "float":
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", seq, width])
        nodes = [
            helper.make_node("MatMul", ["input", "W"], ["proj"]),
            helper.make_node("Shape", ["input"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "two"], ["bl"]),
            helper.make_node(
                "ConstantOfShape", ["bl"], ["attention_mask"], value=numpy_helper.from_array(np.array([1], np.int64))
            ),
        ]
    else:
        inp = helper.make_tensor_value_info("input", TensorProto.INT64, ["B", seq])
        nodes = [
            helper.make_node("Gather", ["W", "input"], ["proj"]),
            helper.make_node("Equal", ["input", "pad"], ["is_pad"]),
            helper.make_node("Not", ["is_pad"], ["real"]),
            helper.make_node("Cast", ["real"], ["attention_mask"], to=TensorProto.INT64),
        ]
    nodes.append(helper.make_node("Add", ["proj", "pos"], ["hidden"]))
    outputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", seq, D]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", seq]),
    ]
    return _save(_model(nodes, [inp], outputs, consts), path)


def build_output_head(path: Path, rng, classes: int) -> str:
    """logits = masked_mean(last_hidden) @ W + b."""
    from onnx import TensorProto, helper, numpy_helper

    consts = _axes() + [
        numpy_helper.from_array(rng.standard_normal((D, classes)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b"),
    ]
    nodes = _masked_mean_nodes("last_hidden", "attention_mask", "pooled", keepdims=0)
    nodes += [helper.make_node("MatMul", ["pooled", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"])]
    inputs = [
        helper.make_tensor_value_info("last_hidden", TensorProto.FLOAT, ["B", "L", D]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", classes])]
    return _save(_model(nodes, inputs, outputs, consts), path)


SYNTHETIC_TASKS = {  # name: (input kind, seq_len, width or vocab, classes)
    "vec": ("float", 4, 3, 3),
    "vec2": ("float", 4, 3, 5),
    "tok": ("ids", 6, 7, 2),
}


def build_synthetic_repo(root: Path, tasks: dict = SYNTHETIC_TASKS, seed: int = 0) -> Path:
    from fpt_deploy.artifacts import (
        NORMS_FILE,
        BackboneArtifact,
        Repository,
        TaskArtifact,
        backbone_file,
        graph_files,
        task_dir,
        task_file,
        write_json,
    )
    from fpt_deploy.taskspec import TaskSpec

    rng = np.random.default_rng(seed)
    fingerprint = hashlib.sha256(b"synthetic-backbone").hexdigest()
    sha = build_backbone(root / backbone_file(fingerprint))
    backbone = BackboneArtifact(
        fingerprint=fingerprint,
        name="synthetic",
        hidden_size=D,
        num_norms=N_NORM,
        norm_names=["n0", "n1"],
        files={"fp32": backbone_file(fingerprint)},
        sha256={"fp32": sha},
        opset=17,
    )
    repo = Repository(root=root, backbones={fingerprint: backbone})
    for name, (kind, seq, width, classes) in tasks.items():
        tdir = task_dir(name)
        files = {**graph_files(tdir), "norms": f"{tdir}/{NORMS_FILE}"}
        sums = {
            "input": build_input_head(root / files["input"], rng, kind, seq, width),
            "output": build_output_head(root / files["output"], rng, classes),
        }
        np.savez(
            root / files["norms"],
            norm_weight=(1 + 0.1 * rng.standard_normal((N_NORM, D))).astype(np.float32),
            norm_bias=(0.1 * rng.standard_normal((N_NORM, D))).astype(np.float32),
        )
        sums["norms"] = hashlib.sha256((root / files["norms"]).read_bytes()).hexdigest()
        spec = TaskSpec(
            name=name,
            input_shape=(seq, width) if kind == "float" else (seq,),
            input_dtype="float32" if kind == "float" else "int64",
            seq_len=seq,
            token_dim=width if kind == "float" else 0,
            vocab_size=0 if kind == "float" else width,
            num_classes=classes,
            labels=tuple(str(c) for c in range(classes)),
        )
        art = TaskArtifact(
            name=name,
            fingerprint=fingerprint,
            spec=spec,
            input={"name": "input", "shape": [-1, *spec.input_shape], "dtype": spec.input_dtype},
            output={"name": "logits", "shape": [-1, *spec.logits_shape], "dtype": "float32"},
            labels=list(spec.labels),
            files=files,
            sha256=sums,
        )
        write_json(root / task_file(name), art.to_json())
        repo.tasks[name] = art
    repo.save_manifest()
    return root


def synthetic_inputs(task: str, rows: int, rng) -> np.ndarray:
    """Valid raw inputs for a synthetic task; ``tok`` rows get random real lengths 1..6 (then padding)."""
    kind, seq, width, _ = SYNTHETIC_TASKS[task]
    if kind == "float":
        return rng.standard_normal((rows, seq, width)).astype(np.float32)
    ids = rng.integers(1, width, size=(rows, seq)).astype(np.int64)
    lengths = rng.integers(1, seq + 1, size=rows)
    ids[np.arange(seq)[None, :] >= lengths[:, None]] = 0
    return ids


@contextmanager
def gated_client(config, **batcher_options):
    """An in-process app whose batcher holds every batch until ``gate`` is set.

    Yields ``(client, state, gate, entered)``: ``entered`` is set once a batch reaches the gate.
    ``batcher_options`` override the config's batcher fields (max_batch_size, max_queue_size, ...).
    """
    from fastapi.testclient import TestClient
    from fpt_deploy.serving.metrics import ServingMetrics
    from fpt_deploy.serving.server import ServerState, create_app
    from fpt_deploy.serving.service import InferenceService, build_pipeline

    gate, entered = threading.Event(), threading.Event()

    def hold(executor):
        def held(batch):
            entered.set()
            gate.wait(10)
            executor(batch)

        return held

    config = dataclasses.replace(config, **batcher_options)
    pipeline = build_pipeline(config, metrics=ServingMetrics(), wrap=hold)
    state = ServerState(InferenceService(pipeline), config)
    with TestClient(create_app(state)) as client:
        try:
            yield client, state, gate, entered
        finally:
            gate.set()


@pytest.fixture(scope="session")
def synthetic_repo(tmp_path_factory) -> Path:
    return build_synthetic_repo(tmp_path_factory.mktemp("synthetic-repo"))


@pytest.fixture
def make_inputs():
    """``make_inputs(task, rows, rng)``: valid raw inputs for a synthetic task."""
    return synthetic_inputs
