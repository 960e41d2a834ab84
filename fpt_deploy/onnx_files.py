"""ONNX graphs past protobuf's 2 GB: saved with external data, checked and inferred without serialising. Torch-free.

A ``ModelProto`` can hold more than 2 GB in memory, but it cannot be serialised in one piece:
``SerializeToString``, ``onnx.checker.check_model(model)`` and ``onnx.shape_inference.infer_shapes(model)``
all fail on gpt2-large in fp32. So a large graph is saved with its weights in ``<file>.data`` beside
it and checked by path (``save_model``), handed to ONNX Runtime by path, and its shapes are inferred on
a copy whose large weights are stubs (``infer_shapes``). Small graphs take the in-memory paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

LARGE_BYTES = 1 << 30  # above this a graph is handled through files (margin below protobuf's 2 GB)
_STUB_BYTES = 1 << 16  # initializers larger than this are stubbed for shape inference


def is_large(model) -> bool:
    """Whether ``model`` is too big for the in-memory (serialising) paths."""
    return model.ByteSize() > LARGE_BYTES


def save_model(model, path: str | Path, *, location: str | None = None) -> Path:
    """Save ``model`` at ``path`` (weights in ``location`` beside it when large) and check the file by path.

    ``location`` (default ``<file name>.data``) is recorded in the graph relative to its folder.
    """
    import onnx

    path = Path(path)
    if is_large(model):
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location or f"{path.name}.data",
        )
    else:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def check_model(model) -> None:
    """``onnx.checker.check_model`` in memory for a small graph; a large one is checked when saved (``save_model``)."""
    import onnx

    if is_large(model):
        log.debug("graph of %d bytes: checked by path when it is saved", model.ByteSize())
        return
    onnx.checker.check_model(model)


def infer_shapes(model):
    """``model`` with inferred ``value_info``; a large one is inferred on a copy with its big weights stubbed."""
    import onnx
    from onnx import TensorProto

    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:
        if init.ByteSize() > _STUB_BYTES:  # dims and type stay: all that inference reads of a weight
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(name)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.add(key="location", value="stub")
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    return out
