"""Names a package exports from its submodules, each imported on first use (PEP 562).

A package whose config module the CLI reads to build its options (``fpt_deploy.training.config``,
``fpt_deploy.export.config``) must import without torch: its ``__init__`` names what it exports and
where, and loads a submodule only when one of its names is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each name to the submodule defining it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
