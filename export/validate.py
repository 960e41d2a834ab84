"""Every export is checked, as Optimum does: ONNX Runtime against PyTorch on real inputs.

The largest absolute difference is logged; above tolerance an ``ExportMismatchError`` is raised, so
a graph that disagrees with the reference never reaches the repository.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpt_deploy.artifacts import BACKBONE_OUTPUT, INPUT_HEAD_INPUT
from fpt_deploy.errors import ArtifactError, ExportMismatchError

log = logging.getLogger(__name__)

CHUNK = 64  # rows per ORT / PyTorch call during validation


def ort_session(path: Path):
    """A plain CPU ONNX Runtime session for ``path``; an unreadable graph is an ``ArtifactError``.

    Export checks the portable files themselves; a runtime that rewrites them at load checks its own
    copy against them (``serving.runtimes``).
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types, all from RuntimeError or Exception
        raise ArtifactError(f"{path} is not a loadable ONNX graph ({e}); re-run `fpt-deploy export`") from e


@dataclass
class OrtTask:
    """One task run with ONNX Runtime: input head -> backbone (its norm rows) -> output head."""

    input_head: object  # onnxruntime.InferenceSession
    output_head: object
    norm_weight: np.ndarray  # (N_norm, D)
    norm_bias: np.ndarray

    @classmethod
    def load(cls, input_path: Path, output_path: Path, norms: tuple[np.ndarray, np.ndarray]) -> OrtTask:
        return cls(ort_session(input_path), ort_session(output_path), *norms)

    def embed(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden (B, L, D), attention_mask (B, L))."""
        hidden, mask = self.input_head.run(None, {INPUT_HEAD_INPUT: raw})
        return hidden, mask

    def norm_rows(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """This task's norms repeated for ``batch`` rows: (B, N_norm, D) each."""
        return (
            np.broadcast_to(self.norm_weight, (batch, *self.norm_weight.shape)).copy(),
            np.broadcast_to(self.norm_bias, (batch, *self.norm_bias.shape)).copy(),
        )

    def read_out(self, last_hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.output_head.run(None, {"last_hidden": last_hidden, "attention_mask": mask})[0]

    def logits(self, backbone, raw: np.ndarray) -> np.ndarray:
        """Logits for a raw input batch through ``backbone`` (an ORT session), CHUNK rows a call."""
        out = []
        for i in range(0, len(raw), CHUNK):
            hidden, mask = self.embed(raw[i : i + CHUNK])
            weight, bias = self.norm_rows(len(hidden))
            last = run_backbone(backbone, hidden, mask, weight, bias)
            out.append(self.read_out(last, mask))
        return np.concatenate(out)


def run_backbone(backbone, hidden, mask, norm_weight, norm_bias) -> np.ndarray:
    feed = {"hidden": hidden, "attention_mask": mask, "norm_weight": norm_weight, "norm_bias": norm_bias}
    return backbone.run([BACKBONE_OUTPUT], feed)[0]


def torch_logits(model, raw: np.ndarray) -> np.ndarray:
    """The PyTorch reference, in the same chunks."""
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(raw[i : i + CHUNK])).numpy() for i in range(0, len(raw), CHUNK)])


def _check(what: str, diff: float, atol: float) -> float:
    if not np.isfinite(diff) or diff > atol:
        raise ExportMismatchError(
            f"{what}: ONNX Runtime and PyTorch differ by up to {diff:.3g} (> atol {atol:g}); "
            "the export is wrong, nothing was written for it"
        )
    log.info("%s: max |ORT - PyTorch| = %.3g (atol %g)", what, diff, atol)
    return diff


def check_backbone(body, backbone, atol: float, batch: int = 5, length: int = 13) -> float:
    """The body alone, on hidden states of unit scale with some padded rows and the pretrained norms."""
    import torch

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, length, body.hidden_size, generator=g)  # (B, L, D)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1:, length // 2 + 1 :] = 0  # padded rows; never a row without a real token
    weight, bias = (t.expand(batch, -1, -1).contiguous() for t in body.default_norms())  # (B, N_norm, D)
    with torch.no_grad():
        ref = body(hidden, mask, weight, bias).numpy()
    got = run_backbone(backbone, hidden.numpy(), mask.numpy(), weight.numpy(), bias.numpy())
    real = mask.numpy().astype(bool)  # padded positions are don't-care: no output head reads them
    return _check(f"backbone {body.fingerprint()[:16]}", float(np.abs(got - ref)[real].max()), atol)


def check_task(name: str, model, ort_task: OrtTask, backbone, raw: np.ndarray, atol: float) -> float:
    """Logits of the exported graphs vs the PyTorch model on real held-out inputs ``raw``."""
    diff = float(np.abs(ort_task.logits(backbone, raw) - torch_logits(model, raw)).max())
    return _check(f"task {name} ({len(raw)} held-out rows)", diff, atol)


def check_mixed_batch(tasks: dict[str, tuple[OrtTask, np.ndarray]], backbone, atol: float, rows: int = 64) -> float:
    """One backbone call on rows of different tasks, each with its own norm rows, vs each task alone.

    ``tasks`` maps a name to its ORT pipeline and raw inputs. Rows alternate between tasks; shorter
    tasks are padded (mask 0) to the longest length, as a runtime that mixes lengths would do.
    """
    names = list(tasks)
    owner = [names[i % len(names)] for i in range(rows)]  # row -> task
    parts, alone = {}, {}
    for name in names:
        t, raw = tasks[name]
        take = raw[np.arange(owner.count(name)) % len(raw)]
        hidden, mask = t.embed(take)
        parts[name] = (hidden, mask, *t.norm_rows(len(take)))
        alone[name] = t.read_out(run_backbone(backbone, *parts[name]), mask)  # the per-task reference
    length, d = max(p[0].shape[1] for p in parts.values()), parts[names[0]][0].shape[2]
    hidden = np.zeros((rows, length, d), np.float32)
    mask = np.zeros((rows, length), np.int64)
    weight = np.zeros((rows, *parts[names[0]][2].shape[1:]), np.float32)
    bias = np.zeros_like(weight)
    index = {name: [i for i, o in enumerate(owner) if o == name] for name in names}
    for name, idx in index.items():
        h, m, w, b = parts[name]
        hidden[idx, : h.shape[1]], mask[idx, : m.shape[1]], weight[idx], bias[idx] = h, m, w, b
    last = run_backbone(backbone, hidden, mask, weight, bias)  # ONE call: (rows, length, D)
    diff = 0.0
    for name, idx in index.items():
        own_len = parts[name][0].shape[1]
        logits = tasks[name][0].read_out(np.ascontiguousarray(last[idx, :own_len]), parts[name][1])
        diff = max(diff, float(np.abs(logits - alone[name]).max()))
    what = f"mixed batch of {rows} rows ({', '.join(names)}) in one backbone call vs each task alone"
    if not np.isfinite(diff) or diff > atol:
        raise ExportMismatchError(
            f"{what}: differs by up to {diff:.3g} (> atol {atol:g}); the backbone does not keep rows independent"
        )
    log.info("%s: max diff %.3g", what, diff)
    return diff


def accuracy(ort_task: OrtTask, backbone, raw: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of outputs right (the figure training reports), through ONNX Runtime."""
    logits = ort_task.logits(backbone, raw)  # (N, C) or (N, outputs, C)
    return float((logits.argmax(-1).reshape(-1) == labels.reshape(-1)).mean())
