"""ONNX Runtime's own rewrite of a portable backbone graph, applied when the ``ort`` runtimes load it.

A repository's ``backbone.onnx`` holds standard ONNX operators only, which TensorRT, Triton and any
ONNX runtime read. ONNX Runtime runs faster on a copy rewritten for it (``rewrite_for_ort``):

1. ``residual_sums``: each residual ``Add`` feeding a ``LayerNormalization`` becomes ``Sum`` (same
   arithmetic). ONNX Runtime's CPU provider would otherwise fuse the pair into
   ``SkipLayerNormalization``, whose kernel is much slower than the two ops it replaces
   (``python -m bench.export_backbone --fp32-residual-sums`` measures it). Done first, so the fusions
   below do not build that op either.
2. onnxscript's ``optimize_for_ort`` (the rewriter ONNX Runtime's own tools use for dynamo-exported
   models): scaled-dot-product attention becomes one ``MultiHeadAttention``, the erf GELU with its
   bias one ``BiasGelu`` (both ``com.microsoft``).
3. ``pack_attention``: the bodies project q, k and v with ONE packed (D, 3D) weight, so that MatMul,
   its bias and the Split fold into the attention: one ``Attention`` op a layer.

The rewritten copy is checked against the portable graph on a small random batch
(``check_parity``) and refused above tolerance. ``serving.runtimes.cache`` keeps it on disk, keyed
by the source's sha256 and ``REWRITE_VERSION``, so a server start does this once per file.

A real backbone is rewritten in a child process (``python -m fpt_deploy.serving.runtimes.ort_rewrite
SRC DST``): in the server's own process the rewriter's freed memory stays resident. Graphs under
``IN_PROCESS_BYTES`` (test models) are rewritten in-process. The child stops, removing what it wrote,
when its parent dies (a server killed mid-start): nobody would read its copy, and the next start's
own rewrite should not compete with it for memory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.cache import Rewrite, RewriteRefused, cached_rewrite
from fpt_deploy.serving.runtimes.sessions import import_onnxruntime

from fpt_deploy.artifacts import BACKBONE_INPUTS

log = logging.getLogger(__name__)

REWRITE_VERSION = 2  # bump whenever the rewrite's output changes: cached copies are rebuilt
IN_PROCESS_BYTES = 2**20  # smaller graphs (test models) are rewritten in this process: no child start-up
PARITY_ATOL = 1e-3  # |rewritten - portable| allowed on the parity batch, scaled by max(1, max |portable|)
_NOTHING_TO_REWRITE, _REFUSED = 3, 4  # the child's exit statuses besides 0 (rewritten) and 1 (failed)
PARENT_CHECK_S = 1.0  # how often the child checks that the process that started it still runs


def rewrite_key() -> str:
    """What the cached copy depends on besides the source file: this rewrite and the libraries doing it.

    The modules' own versions, not their distributions': ``onnxruntime-gpu`` installs the ``onnxruntime``
    module under another distribution name (the [gpu] extra), and has no ``onnxruntime`` metadata."""
    import onnxscript

    ort = import_onnxruntime()
    return f"ort-rewrite/{REWRITE_VERSION} onnxruntime/{ort.__version__} onnxscript/{onnxscript.__version__}"


@contextmanager
def ort_graph(path: Path) -> Iterator[str]:
    """The file ONNX Runtime should load for the portable graph ``path``: its rewritten copy from the
    cache (made now if needed), or ``path`` itself. Create the session inside the context."""
    with cached_rewrite(Path(path), Rewrite(name="ort", key=rewrite_key(), apply=rewrite_for_ort)) as graph:
        yield str(graph)


def rewrite_for_ort(source: Path, target: Path) -> dict[str, int] | None:
    """Write ``source`` rewritten for ONNX Runtime to ``target``, checked against ``source``.

    Returns what changed (counts by rewrite), or None when nothing applies (nothing written).
    Raises ``RewriteRefused`` when the copy disagrees with ``source``, anything else when it fails.
    """
    if Path(source).stat().st_size <= IN_PROCESS_BYTES:
        counts = _rewrite(Path(source), Path(target))
    else:
        counts = _rewrite_in_child(Path(source), Path(target))
    if counts:
        log.info("%s: ONNX Runtime rewrites %s", source.name, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return counts


def _rewrite_in_child(source: Path, target: Path) -> dict[str, int] | None:
    argv = [sys.executable, "-m", __name__, str(source), str(target)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode == _NOTHING_TO_REWRITE:
        return None
    reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    if done.returncode == _REFUSED:
        raise RewriteRefused(reason)
    raise RuntimeError(f"the rewrite's child process failed: {reason}")


@contextmanager
def _quiet_rewriter():
    """The rewriter logs every pass and constant it looks at; only its warnings matter here."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _rewrite(source: Path, target: Path) -> dict[str, int] | None:
    """The rewrite itself, in whichever process runs it (see ``rewrite_for_ort``)."""
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    proto = onnx.load(str(source))
    inputs = [v.name for v in proto.graph.input]
    outputs = [v.name for v in proto.graph.output]
    changed = {"residual_sum": residual_sums(proto)}
    model = ir.serde.deserialize_model(proto)
    del proto
    with _quiet_rewriter():
        model, counts = optimize_for_ort(model)
    changed.update(counts)
    if [v.name for v in model.graph.inputs] != inputs or [v.name for v in model.graph.outputs] != outputs:
        raise ValueError("the rewrite changed the graph's inputs or outputs")
    proto = ir.serde.serialize_model(model)
    del model
    changed["packed_attention"] = pack_attention(proto)
    changed = {name: n for name, n in changed.items() if n}
    if not changed:
        return None
    target.write_bytes(proto.SerializeToString())
    del proto
    check_parity(source, target)
    return changed


def residual_sums(model) -> int:
    """Rewrite each ``Add`` that feeds a LayerNormalization as ``Sum``, in place; returns how many.

    The arithmetic is the same; ONNX Runtime's SkipLayerNormalization fusion only matches ``Add``.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in model.graph.node:
        add = producer.get(node.input[0]) if node.op_type == "LayerNormalization" else None
        if add is not None and add.op_type == "Add" and len(add.input) == 2:
            add.op_type = "Sum"
            count += 1
    return count


_ORT_TYPES = {  # ONNX Runtime's input type names -> numpy dtypes, for parity feeds of any graph
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


def parity_feeds(session, rows: int = 3, length: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """A small random batch for ``session``'s graph.

    A backbone gets unit-scale hidden states, one right-padded row and norms near 1 and 0. Any other
    graph (a whole task model, in the benchmarks) gets standard-normal floats and integer ones (a
    real token id), every dynamic axis ``rows`` long.
    """
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    if sorted(shapes) != sorted(BACKBONE_INPUTS):
        feeds = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else rows for d in i.shape]
            dtype = np.dtype(_ORT_TYPES.get(i.type, "float32"))
            sample = rng.standard_normal(shape) if dtype.kind == "f" else np.ones(shape)
            feeds[i.name] = sample.astype(dtype)
        return feeds
    d, n = shapes["hidden"][2], shapes["norm_weight"][1]
    if not (isinstance(d, int) and isinstance(n, int)):
        raise ValueError(f"hidden size and norm count must be fixed, got {shapes['hidden']}, {shapes['norm_weight']}")
    mask = np.ones((rows, length), np.int64)
    mask[1, length // 2 :] = 0  # right padding, as the heads write it
    return {
        "hidden": rng.standard_normal((rows, length, d), dtype=np.float32),
        "attention_mask": mask,
        "norm_weight": (1 + 0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
        "norm_bias": (0.1 * rng.standard_normal((rows, n, d))).astype(np.float32),
    }


def check_parity(source: Path, rewritten: Path) -> float:
    """max |rewritten - source| over the outputs on ``parity_feeds``; ``RewriteRefused`` above tolerance.

    A backbone's padded positions are left out: no output head reads them.
    """
    import onnxruntime as ort

    def session(path: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    plain = session(source)
    feeds = parity_feeds(plain)
    want = plain.run(None, feeds)
    names = [o.name for o in plain.get_outputs()]
    del plain
    got = session(rewritten).run(None, feeds)
    worst = 0.0
    for name, g, w in zip(names, got, want, strict=True):
        if "attention_mask" in feeds and g.shape[:2] == feeds["attention_mask"].shape:
            real = feeds["attention_mask"].astype(bool)
            g, w = g[real], w[real]
        diff = float(np.abs(g.astype(np.float64) - w).max(initial=0.0))
        limit = PARITY_ATOL * max(1.0, float(np.abs(w).max(initial=0.0)))
        if not diff <= limit:  # NaN fails too
            raise RewriteRefused(
                f"the rewritten graph's {name} differs from {source.name}'s by {diff:.3g} (> {limit:.3g})"
            )
        worst = max(worst, diff)
    log.debug("%s: rewritten graph within %.3g of the portable one", source.name, worst)
    return worst


def pack_attention(model) -> int:
    """``MatMul(X, W_qkv) + b -> Split -> MultiHeadAttention`` becomes one ``Attention(X, W_qkv, b)``, in place.

    Only where the pattern is exact: a constant (D, 3D) weight and (3D,) bias, a three-way Split on
    the last axis feeding q, k and v, nothing else reading the projections but ``Shape`` nodes of their
    leading (B, L) dims (re-pointed at X), and no bias or padding mask on the MultiHeadAttention itself;
    its attention-bias input, which carries the padding and causal masks, passes through unchanged.
    Returns how many were rewritten.
    """
    from onnx import helper

    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    replaced, dropped = {}, set()
    for mha in model.graph.node:
        if mha.op_type != "MultiHeadAttention":
            continue
        q, k, v, bias, padding, attention_bias = [*mha.input, "", "", ""][:6]
        split = producer.get(q)
        add = producer.get(split.input[0]) if split is not None and split.op_type == "Split" else None
        matmul = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        if matmul is None or matmul.op_type != "MatMul" or list(split.output) != [q, k, v] or bias or padding:
            continue
        w, b = dims.get(matmul.input[1], []), dims.get(add.input[1], [])
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if len(w) != 2 or w[1] != 3 * w[0] or b != [w[1]] or len(split.input) != 1 or axis not in (2, -1):
            continue
        shapes = [r for t in (q, k, v) for r in readers.get(t, []) if r is not mha]
        if any(r.op_type != "Shape" or _shape_end(r) not in (1, 2) for r in shapes):
            continue
        if len(readers.get(split.input[0], [])) != 1 or len(readers.get(add.input[0], [])) != 1:
            continue
        for r in shapes:
            r.input[0] = matmul.input[0]  # X has the same (B, L) leading dims as q, k and v
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        kept = {name: attrs[name] for name in ("scale", "mask_filter_value") if name in attrs}
        replaced[id(mha)] = helper.make_node(
            "Attention",
            [matmul.input[0], matmul.input[1], add.input[1], "", "", attention_bias],
            list(mha.output),
            name=f"{mha.name}_packed",
            domain="com.microsoft",
            num_heads=attrs["num_heads"],
            **kept,
        )
        dropped |= {id(split), id(add), id(matmul)}
    if replaced:
        nodes = [replaced.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(replaced)


def _shape_end(node) -> int | None:
    """The ``end`` attribute of a Shape node (None: to the last axis)."""
    return next((a.i for a in node.attribute if a.name == "end"), None)


def main(argv: list[str] | None = None) -> int:
    """``python -m fpt_deploy.serving.runtimes.ort_rewrite SRC DST``: the child process of ``rewrite_for_ort``.

    Exit 0 with the counts (JSON) on stdout, 3 when nothing applies, 4 when the parity check refused
    the copy, 1 when the rewrite failed; the reason goes to stderr.
    """
    source, target = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        counts = _rewrite(source, target)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which runs the plain graph)
        target.unlink(missing_ok=True)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return _REFUSED if isinstance(e, RewriteRefused) else 1
    if counts is None:
        return _NOTHING_TO_REWRITE
    print(json.dumps(counts))
    return 0


def _exit_with_parent(target: Path) -> None:
    """Exit (removing ``target``, the parent's temporary file) as soon as the parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        target.unlink(missing_ok=True)
        os._exit(1)

    threading.Thread(target=watch, name="fpt-rewrite-parent", daemon=True).start()


if __name__ == "__main__":
    _exit_with_parent(Path(sys.argv[-1]))  # the child of ``_rewrite_in_child``: SRC DST
    sys.exit(main())
