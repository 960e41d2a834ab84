"""Backbone registry: a name maps to a loader that returns a frozen ``Body``.

Adding a backbone is one ``register_backbone`` call in a new module, imported by ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fpt_deploy.errors import UnknownNameError


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    description: str
    source: str  # where its weights come from
    loader: Callable[[], object]  # () -> Body


_REGISTRY: dict[str, BackboneEntry] = {}
_CACHE: dict[str, object] = {}


def register_backbone(name: str, description: str, source: str):
    """Decorator: register ``loader`` under ``name``."""

    def wrap(loader):
        _REGISTRY[name] = BackboneEntry(name, description, source, loader)
        return loader

    return wrap


def list_backbones() -> list[BackboneEntry]:
    return list(_REGISTRY.values())


def load_backbone(name: str):
    """The frozen body registered as ``name``, or loaded from a local Hugging Face folder.

    Bodies are cached per process: training several tasks, or exporting, shares one copy.
    """
    if name not in _CACHE:
        if name in _REGISTRY:
            body = _REGISTRY[name].loader()
        elif Path(name).is_dir():
            from fpt_deploy.backbones.hf import load_local_folder

            body = load_local_folder(Path(name))
        else:
            known = ", ".join(sorted(_REGISTRY))
            raise UnknownNameError(
                f"unknown backbone {name!r}; choose one of {known}, or pass a local Hugging Face model folder"
            )
        body.name = name
        _CACHE[name] = body
    return _CACHE[name]
