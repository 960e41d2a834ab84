"""ONNX Runtime's transformer fusions, applied to a backbone graph when ONNX Runtime loads it.

A repository's ``backbone.onnx`` stays portable: standard ONNX operators only, which TensorRT, Triton
and any ONNX runtime read. ONNX Runtime runs faster on its own fused operators, so ``OrtRuntime`` loads
a rewritten copy (``ort_graph``): onnxscript's ``optimize_for_ort`` (the rewriter ONNX Runtime's own
tools use for dynamo-exported models) turns scaled-dot-product attention into one
``MultiHeadAttention`` and the erf GELU with its bias into one ``BiasGelu`` (both ``com.microsoft``);
then, since the bodies project q, k and v with ONE packed (D, 3D) weight, ``pack_attention`` folds
that MatMul, its bias and the Split into the attention: one ``Attention`` op a layer. The residual
``Sum`` the export writes (export/onnx_workarounds.py) is left alone, so ORT's slow CPU
SkipLayerNormalization stays away.

Measured on this project's 2-core AVX-512 CPU (minilm, 49-token rows, batch 32, 2 threads, medians of
4 alternating rounds): fp32 backbone 281 -> 318 rows/s (1.13x; the packed ``Attention`` is ~3% of it
over ``MultiHeadAttention``), int8 541 -> 651 (1.20x; its q/k/v MatMul is quantized, so it keeps
MultiHeadAttention). The fused fp32 graph differs from the plain one by at most 4e-5 on ``last_hidden``
of real MNIST rows (values up to ~19); the export checks it against PyTorch like the portable one.

The rewrite of a real backbone runs in a child process (``python -m fpt_deploy.ort_fusion SRC DST``)
that writes the fused copy to a temporary folder: done in the server's own process, the rewriter's
freed memory stayed resident (+115 MB for minilm, and the ``bytes`` an ORT session is created from
stay referenced by it). Loaded from that file, minilm's session holds 119 MB, less than the plain
graph's 156 MB. Graphs under ``IN_PROCESS_BYTES`` (test models) are rewritten in-process. About 2 s
at load for minilm. Any failure of the rewriter falls back to the plain graph with a warning: a slower
server, never a broken one.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

IN_PROCESS_BYTES = 2**20  # smaller graphs (test models) are rewritten in this process: no child start-up
_NOTHING_FUSED = 3  # the child's exit status when the graph has nothing to fuse


@contextmanager
def ort_graph(path: Path) -> Iterator[str]:
    """The file ONNX Runtime should load for ``path``: its fused copy while the context is open, else itself.

    Create the session inside the context: the temporary copy is deleted on exit (ONNX Runtime has
    read it by then).
    """
    with tempfile.TemporaryDirectory(prefix="fpt-ort-") as tmp:
        fused = Path(tmp) / "fused.onnx"
        yield str(fused) if fuse_to_file(Path(path), fused) else str(path)


def fuse_to_file(source: Path, target: Path) -> dict[str, int] | None:
    """Write ``source`` with ORT's fusions to ``target``; the fusion counts, or None (nothing written)."""
    try:
        size = source.stat().st_size
    except OSError:
        return None  # a missing file: ONNX Runtime's own load says what is wrong
    if size <= IN_PROCESS_BYTES:
        counts = _fuse_here(source, target)
    else:
        counts = _fuse_in_child(source, target)
    if counts:
        log.info("%s: ONNX Runtime fusions %s", source.name, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return counts


def _fuse_in_child(source: Path, target: Path) -> dict[str, int] | None:
    argv = [sys.executable, "-m", "fpt_deploy.ort_fusion", str(source), str(target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("ONNX Runtime fusions skipped for %s (%s); running the plain graph", source, e)
        return None
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode != _NOTHING_FUSED:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("ONNX Runtime fusions skipped for %s (%s); running the plain graph", source, reason)
    return None


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


def _fuse(source: Path, target: Path) -> dict[str, int] | None:
    """The rewrite itself, in whichever process runs it: the fusion counts, or None when the file is
    unreadable or has nothing to fuse (nothing written). A failing rewrite raises."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    try:
        model = ir.load(str(source))
    except Exception:  # noqa: BLE001  (an unreadable file: ONNX Runtime's own load says what is wrong)
        return None
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    with _quiet_rewriter():
        model, counts = optimize_for_ort(model)
    fused = {name: n for name, n in counts.items() if n}
    if not fused:
        return None
    if [v.name for v in model.graph.inputs] != inputs or [v.name for v in model.graph.outputs] != outputs:
        raise ValueError("the rewrite changed the graph's inputs or outputs")
    proto = ir.serde.serialize_model(model)
    del model
    packed = pack_attention(proto)
    if packed:
        fused["packed_attention"] = packed
    target.write_bytes(proto.SerializeToString())
    return fused


def _fuse_here(source: Path, target: Path) -> dict[str, int] | None:
    try:
        return _fuse(source, target)
    except Exception as e:  # noqa: BLE001  (the rewriter is an optimisation: any failure keeps the plain graph)
        target.unlink(missing_ok=True)
        log.warning(
            "ONNX Runtime fusions skipped for %s (%s: %s); running the plain graph", source, type(e).__name__, e
        )
        return None


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
    """``python -m fpt_deploy.ort_fusion SRC DST``: the child process of ``fuse_to_file``.

    Exit 0 with the fusion counts (JSON) on stdout, 3 when there is nothing to fuse, 1 with the reason
    on stderr when the rewrite failed.
    """
    source, target = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        counts = _fuse(source, target)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which falls back to the plain graph)
        target.unlink(missing_ok=True)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if counts is None:
        return _NOTHING_FUSED
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
