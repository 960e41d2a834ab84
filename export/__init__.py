"""Export: checkpoints -> a validated deployment repository (ONNX graphs, norms, manifest).

``export_task(ExportConfig(...))`` is the one call the CLI makes; the package itself is callable the
same way, ``fpt_deploy.export(ExportConfig(...))`` or ``fpt_deploy.export(checkpoints=[...])``, the
Python API's export (docs/api.md). Writers of other layouts (Triton,
TensorRT) reuse ``write_backbone_graph`` / ``write_task_graphs`` or read the repository it wrote.
"""

import sys
import types

from fpt_deploy.lazy import lazy_exports

# name -> submodule: loaded on first use, so ``fpt_deploy.export.config`` (read by the CLI to build
# its options) imports without torch.
_EXPORTS = {
    "ExportConfig": "config",
    "ExportResult": "exporter",
    "OrtTask": "validate",
    "QuantizationAccuracyError": "quantize",
    "TaskExport": "exporter",
    "TaskGraphs": "graphs",
    "check_mixed_batch": "validate",
    "ensure_backbone": "exporter",
    "ensure_int8_backbone": "exporter",
    "export_task": "exporter",
    "quantize_backbone_int8": "quantize",
    "write_backbone_graph": "graphs",
    "write_task": "exporter",
    "write_task_graphs": "graphs",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)


class _CallablePackage(types.ModuleType):
    def __call__(self, config=None, /, **fields):
        """``export_task`` of ``config`` (an ``ExportConfig``) or of one built from ``fields``."""
        from fpt_deploy.export.config import ExportConfig
        from fpt_deploy.export.exporter import export_task

        from fpt_deploy.choices import config_from

        return export_task(config_from(ExportConfig, config, fields))


sys.modules[__name__].__class__ = _CallablePackage
