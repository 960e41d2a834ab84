"""Export: checkpoints -> a validated deployment repository (ONNX graphs, norms, manifest).

``export_task(ExportConfig(...))`` is the one call the CLI makes. Writers of other layouts (Triton,
TensorRT) reuse ``write_backbone_graph`` / ``write_task_graphs`` or read the repository it wrote.
"""

from fpt_deploy.export.config import ExportConfig
from fpt_deploy.export.exporter import (
    ExportResult,
    TaskExport,
    ensure_backbone,
    ensure_int8_backbone,
    export_task,
    write_task,
)
from fpt_deploy.export.graphs import TaskGraphs, write_backbone_graph, write_task_graphs
from fpt_deploy.export.quantize import QuantizationAccuracyError, quantize_backbone_int8
from fpt_deploy.export.validate import OrtTask, check_mixed_batch

__all__ = [
    "ExportConfig",
    "ExportResult",
    "OrtTask",
    "QuantizationAccuracyError",
    "TaskExport",
    "TaskGraphs",
    "check_mixed_batch",
    "ensure_backbone",
    "ensure_int8_backbone",
    "export_task",
    "quantize_backbone_int8",
    "write_backbone_graph",
    "write_task",
    "write_task_graphs",
]
