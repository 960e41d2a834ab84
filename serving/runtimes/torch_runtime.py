"""The ``torch`` runtime: the repository's body in PyTorch on any torch device (cuda, cpu, mps, ROCm).

It serves exactly the body the repository holds, without its original weights package or
``transformers``:

1. the body is built from the architecture and config the manifest records for the backbone
   (``extra.architecture`` / ``extra.config``, written by ``fpt-deploy export``);
2. its weights are read from the repository's checksum-verified ``backbone.onnx``: every ``nn.Linear``
   of the body, in the order the forward pass uses them, is one ``MatMul`` by a weight initializer
   (stored transposed) followed by an ``Add`` of its bias, in graph order (``_linear_weights``);
3. on load, the body at the chosen ``--precision`` runs one probe batch (mixed tasks, padded rows)
   beside the fp32 ONNX in ONNX Runtime; a body whose ``last_hidden`` differs beyond ``PARITY_ATOL``
   (or is not finite) is refused with ``ExportMismatchError`` (``check_parity``).

Norm tables (T, N_norm, D) stay resident on the device; a batch sends its rows and one task index per
row, and the rows' norms are gathered there (``index_select``), as the TensorRT engine does.

``--cuda-graphs`` (cuda only, off by default): one CUDA graph per (batch bucket, length) is captured
on first use and replayed, batches padded up to the next power of two rows; it removes the per-kernel
launch cost that dominates small batches on a GPU. A CPU has no launch cost to remove, so there the
option is refused. Imported only when ``--runtime torch`` is chosen: the base install stays torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from fpt_deploy.serving.runtimes.base import Runtime
from fpt_deploy.serving.runtimes.sessions import import_onnxruntime

from fpt_deploy.artifacts import BACKBONE_INPUTS, BACKBONE_OUTPUT, BackboneArtifact, open_repository
from fpt_deploy.errors import ArtifactError, ConfigError, ExportMismatchError, RuntimeUnavailableError

if TYPE_CHECKING:
    from fpt_deploy.serving.config import RuntimeConfig

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
# Largest |torch - ONNX Runtime fp32| of last_hidden at real tokens on the probe batch, by precision.
# Low precisions round every MatMul input; bf16 keeps 8 mantissa bits, fp16 11.
PARITY_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1.5e-1}
PROBE_ROWS, PROBE_LEN = 4, 16
TORCH_HELP = "--runtime torch needs PyTorch: pip install 'fpt-deploy[torch]' (or [train])"


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise RuntimeUnavailableError(f"{TORCH_HELP} ({e})") from e
    return torch


def resolve_device(torch, name: str | None):
    """``name`` as a ``torch.device`` after checking it exists here; None: cuda when available, else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device ({e}); use cuda, cuda:1, cpu or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"--device {name}: torch sees no CUDA (or ROCm) GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeUnavailableError(f"--device {name}: torch sees no Apple GPU (MPS) here; use --device cpu")
    return device


def repository_backbone(backbone_file: Path) -> BackboneArtifact:
    """The manifest's record of ``backbone_file``: the repository's fp32 ``backbones/<fp>/backbone.onnx``."""
    backbone_file = Path(backbone_file).resolve()
    root = backbone_file.parents[2] if len(backbone_file.parents) > 2 else backbone_file.parent
    try:
        repo = open_repository(root)
    except ArtifactError as e:
        raise ArtifactError(
            f"--runtime torch serves a repository's backbone.onnx, whose manifest records the body's architecture; "
            f"{backbone_file} is not inside one ({e})"
        ) from e
    for backbone in repo.backbones.values():
        if "fp32" in backbone.files and (root / backbone.files["fp32"]).resolve() == backbone_file:
            backbone.path(root, "fp32")  # checksum verified
            return backbone
    raise ArtifactError(f"{backbone_file} is not the fp32 backbone of any body listed in {root / 'manifest.json'}")


def _body_class(architecture: str):
    from fpt_deploy.backbones.bert import BertBody
    from fpt_deploy.backbones.gpt2 import GPT2Body

    classes = {"bert": BertBody, "gpt2": GPT2Body}
    if architecture not in classes:
        raise ArtifactError(
            f"--runtime torch builds {', '.join(classes)} bodies; this backbone is {architecture!r}: "
            "serve it with --runtime ort"
        )
    return classes[architecture]


def _linear_weights(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight (out, in), bias (out,)) of every MatMul by an initializer followed by an Add of one, in graph order."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])  # (in, out)
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i in inits and i != node.output[0]]
        if len(biases) != 1 or weight.ndim != 2:
            raise ArtifactError(
                f"MatMul {node.name!r} of the backbone graph is not a linear layer (weight, then one bias Add); "
                "--runtime torch cannot map its weights: serve it with --runtime ort"
            )
        found.append((weight.T, numpy_helper.to_array(inits[biases[0]])))
    return found


def body_from_repository(backbone: BackboneArtifact, backbone_file: Path):
    """The body ``backbone`` records, fp32 on the CPU, weights read from its ONNX graph (see the module doc)."""
    import onnx
    import torch

    config = backbone.extra.get("config")
    architecture = backbone.extra.get("architecture")
    if not config or not architecture:
        raise ArtifactError(
            f"the manifest does not record backbone {backbone.fingerprint[:16]}'s architecture and config; "
            "re-export it with this fpt-deploy (`fpt-deploy export`) to serve it with --runtime torch"
        )
    body = _body_class(architecture)(config)
    if (body.hidden_size, body.num_norms) != (backbone.hidden_size, backbone.num_norms):
        raise ArtifactError(
            f"the recorded config builds a body of width {body.hidden_size} with {body.num_norms} norms; "
            f"the manifest says {backbone.hidden_size} and {backbone.num_norms}"
        )
    model = onnx.load(str(backbone_file))
    if [i.name for i in model.graph.input] != list(BACKBONE_INPUTS):
        raise ArtifactError(f"{backbone_file} does not have the backbone inputs {list(BACKBONE_INPUTS)}")
    linears = [m for m in body.modules() if isinstance(m, torch.nn.Linear)]
    weights = _linear_weights(model)
    if len(weights) != len(linears):
        raise ArtifactError(
            f"{backbone_file} holds {len(weights)} linear layers, the {architecture} body {len(linears)}; "
            "serve it with --runtime ort"
        )
    with torch.no_grad():
        for k, (layer, (w, b)) in enumerate(zip(linears, weights, strict=True)):
            if tuple(w.shape) != tuple(layer.weight.shape) or tuple(b.shape) != tuple(layer.bias.shape):
                raise ArtifactError(
                    f"linear layer {k} of {backbone_file} is {w.shape}, the body's is {tuple(layer.weight.shape)}"
                )
            layer.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            layer.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
    return body.freeze()


def rows_in_use(weight: np.ndarray) -> int:
    """Table rows up to the last one holding any value (a growing table keeps spare all-zero rows)."""
    used = np.flatnonzero(np.any(weight != 0, axis=(1, 2)))
    return int(used[-1]) + 1 if used.size else 0


def probe_batch(tables_rows: int, hidden_size: int, max_len: int, seed: int = 0):
    """(hidden, attention_mask, task_index) of ``PROBE_ROWS`` rows: mixed tasks, every other row padded."""
    rng = np.random.default_rng(seed)
    length = max(2, min(PROBE_LEN, max_len))
    hidden = rng.standard_normal((PROBE_ROWS, length, hidden_size)).astype(np.float32)
    mask = np.ones((PROBE_ROWS, length), np.int64)
    mask[1::2, length // 2 :] = 0  # real tokens are a prefix
    return hidden, mask, (np.arange(PROBE_ROWS) % max(1, tables_rows)).astype(np.int64)


def check_parity(runtime: TorchRuntime, backbone_file: Path, atol: float) -> float:
    """Max |runtime - ONNX Runtime fp32| of last_hidden at real tokens; ``ExportMismatchError`` above ``atol``.

    The probe's rows use the tasks' own norms (the identity norms while no task is loaded).
    """
    ort = import_onnxruntime()
    used = rows_in_use(runtime.norm_weight)
    weight, bias = runtime.norm_weight[:used], runtime.norm_bias[:used]
    if not used:
        weight = np.ones((1, *runtime.norm_weight.shape[1:]), np.float32)
        bias = np.zeros_like(weight)
    hidden, mask, index = probe_batch(len(weight), weight.shape[2], runtime.max_positions)
    session = ort.InferenceSession(str(backbone_file), providers=["CPUExecutionProvider"])
    feeds = {"hidden": hidden, "attention_mask": mask, "norm_weight": weight[index], "norm_bias": bias[index]}
    expected = session.run([BACKBONE_OUTPUT], feeds)[0]
    got = runtime.run_with_tables(hidden, mask, index, runtime.device_tables(weight, bias))
    real = mask.astype(bool)  # padded positions are never read by a head
    diff = float(np.abs(got - expected)[real].max()) if np.isfinite(got[real]).all() else float("inf")
    if not diff <= atol:
        raise ExportMismatchError(
            f"the {runtime.precision} torch body on {runtime.device} differs from the repository's fp32 ONNX by "
            f"{diff:.3g} (max |last_hidden| difference on the probe batch, tolerance {atol:g}); serve it at a "
            "higher --precision (fp32; fp16 rounds less than bf16) or with --runtime ort"
        )
    return diff


@dataclass
class _Graph:
    """One captured CUDA graph: its static inputs and output, and the tables it was captured over."""

    graph: object
    hidden: object  # (B, L, D) device tensor
    mask: object  # (B, L)
    index: object  # (B,)
    out: object  # (B, L, D)
    tables: tuple


class TorchRuntime(Runtime):
    """``--runtime torch``: the body in PyTorch on ``device`` at ``precision``, norm tables on the device."""

    name = "torch"
    parity_atol: ClassVar[dict[str, float]] = PARITY_ATOL

    def __init__(
        self,
        backbone_file: Path,
        norm_weight: np.ndarray,
        norm_bias: np.ndarray,
        *,
        threads: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        cuda_graphs: bool = False,
    ) -> None:
        torch = self._torch = _import_torch()
        super().__init__(norm_weight, norm_bias)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        self.device = resolve_device(torch, device)
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"--cuda-graphs needs a cuda device (got {self.device}); a CPU has no launches to save")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.precision = precision
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        backbone = repository_backbone(backbone_file)
        self.fingerprint = backbone.fingerprint
        body = body_from_repository(backbone, backbone_file)
        self.max_positions = body.max_positions
        self.body = body.to(device=self.device, dtype=self.dtype)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.cuda_graphs = cuda_graphs
        self._device_tables = self.device_tables(self.norm_weight, self.norm_bias)
        self.parity = check_parity(self, backbone_file, self.parity_atol[precision])
        log.info(
            "torch body %s on %s (%s%s): max |last_hidden - ONNX fp32| %.3g on the probe batch",
            backbone.fingerprint[:16],
            self.device,
            precision,
            ", CUDA graphs" if cuda_graphs else "",
            self.parity,
        )

    @classmethod
    def from_config(cls, backbone_file, norm_weight, norm_bias, config: RuntimeConfig) -> TorchRuntime:
        return cls(
            backbone_file,
            norm_weight,
            norm_bias,
            threads=config.threads,
            device=config.device,
            precision=config.precision,
            cuda_graphs=config.cuda_graphs,
        )

    @classmethod
    def backbone_file(cls, backbone: BackboneArtifact, root: Path, variant: str) -> Path:
        """The fp32 ONNX graph: its weights are what the body runs (``--precision`` casts them on the device)."""
        if variant != "fp32":
            raise ConfigError(
                f"--runtime torch runs the fp32 body (got --backbone-variant {variant}); "
                "choose its precision with --precision bf16 or fp16"
            )
        return backbone.path(root, "fp32")

    def set_norm_tables(self, norm_weight: np.ndarray, norm_bias: np.ndarray) -> None:
        super().set_norm_tables(norm_weight, norm_bias)
        self._device_tables = self.device_tables(self.norm_weight, self.norm_bias)  # one swap

    def device_tables(self, weight: np.ndarray, bias: np.ndarray) -> tuple:
        """Norm tables (T, N_norm, D) as device tensors in the body's dtype."""
        return tuple(self._torch.from_numpy(t).to(self.device, dtype=self.dtype) for t in (weight, bias))

    def run_backbone(self, hidden, attention_mask, task_index):
        return self.run_with_tables(hidden, attention_mask, task_index, self._device_tables)

    def run_with_tables(self, hidden, attention_mask, task_index, tables) -> np.ndarray:
        """last_hidden (B, L, D) float32 of one batch, each row normalised with row ``task_index`` of ``tables``."""
        torch = self._torch
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(hidden)).to(self.device, dtype=self.dtype)
            m = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
            idx = torch.from_numpy(np.ascontiguousarray(task_index, dtype=np.int64)).to(self.device)
            out = self._replay(h, m, idx, tables) if self.cuda_graphs else self._forward(h, m, idx, tables)
            return out.float().cpu().numpy()

    def _forward(self, hidden, mask, index, tables):
        weight, bias = tables
        return self.body(hidden, mask, weight.index_select(0, index), bias.index_select(0, index))  # (B, L, D)

    def _replay(self, hidden, mask, index, tables):
        """Run through the CUDA graph of (next power of two rows, this length), captured on first use."""
        B, L = mask.shape
        bucket = 1 << (B - 1).bit_length()
        entry = self._graphs.get((bucket, L))
        if entry is None or entry.tables is not tables:
            entry = self._capture(bucket, L, tables)
        entry.hidden[:B].copy_(hidden)
        entry.mask[:B].copy_(mask)
        entry.index[:B].copy_(index)
        entry.graph.replay()
        return entry.out[:B]

    def _capture(self, rows: int, length: int, tables) -> _Graph:
        torch = self._torch
        d = tables[0].shape[2]
        hidden = torch.zeros(rows, length, d, device=self.device, dtype=self.dtype)
        mask = torch.ones(rows, length, device=self.device, dtype=torch.int64)  # padded rows: all real, no NaN
        index = torch.zeros(rows, device=self.device, dtype=torch.int64)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (kernel selection, allocator)
                self._forward(hidden, mask, index, tables)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(hidden, mask, index, tables)
        entry = _Graph(graph, hidden, mask, index, out, tables)
        self._graphs[(rows, length)] = entry
        log.debug("captured a CUDA graph for %d rows of %d tokens", rows, length)
        return entry

    def close(self) -> None:
        self._graphs.clear()
        self.body = None
        self._device_tables = ()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()
