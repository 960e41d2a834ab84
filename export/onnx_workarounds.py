"""What it takes to get clean graphs out of ``torch.onnx.export`` in torch 2.14, kept in one place.

- The TorchScript exporter (``dynamo=False``) cannot export the body: ``F.layer_norm(x, x.shape[-1:])``
  becomes a traced, non-constant ``normalized_shape`` once the axes are dynamic, and it fails with
  ``SymbolicValueError``. We use the ``torch.export``-based exporter (``dynamo=True``), which emits
  opset-18 ``LayerNormalization`` and keeps the per-row scale and bias as a separate Mul/Add on graph
  inputs, so nothing task-specific is constant-folded into the body.
- ``torch.export`` specialises an axis whose example size is 0 or 1, so example inputs use batch 2
  and a length of at least 2 (``example_batch``).
- Below opset 18 the exporter converts the graph down with the ONNX version converter and says so
  in a warning; that, and its notes about axis renaming, go to the debug log instead of the console.
- Every ``torch.onnx.export`` call rebuilds its ATen-to-ONNX registry from torchlib (about a second of
  pure Python, a fifth of a small export). Without a custom translation table the exporter never changes
  that registry, so ``_shared_torchlib_registry`` builds it once per opset and hands the same one back.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLE_BATCH = 2  # never 0 or 1: torch.export would specialise the batch axis to a constant


_REGISTRIES: dict = {}  # (registry class, opset) -> the one registry built for it


@contextmanager
def _shared_torchlib_registry():
    """Within the block, ``ONNXRegistry.from_torchlib`` builds one registry per (class, opset) and reuses it."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: export as it comes, only slower
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return
    build = original.__func__

    def shared(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    ONNXRegistry.from_torchlib = classmethod(shared)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


@contextmanager
def _quiet_exporter():
    """Route the exporter's warnings and log chatter to our debug log."""
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            log.debug("torch.onnx: %s", w.message)
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    module,
    args: tuple,
    path: Path,
    *,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Export ``module(*args)`` to one self-contained ONNX file at ``path`` with named dynamic axes."""
    import torch

    dims: dict[str, object] = {}

    def dim(name: str):
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1)
        return dims[name]

    dynamic_shapes = tuple({axis: dim(n) for axis, n in dynamic_axes.get(name, {}).items()} for name in input_names)
    with _quiet_exporter(), _shared_torchlib_registry(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
