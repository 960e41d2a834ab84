"""Backbone registry: a name maps to a loader that returns a frozen ``Body``.

Every backbone is an entry point of the group ``fpt_deploy.backbones`` (fpt-deploy's own are declared
in pyproject.toml); a plug-in package declares its own the same way::

    [project.entry-points."fpt_deploy.backbones"]
    my-bert = "my_package.backbones:load_my_bert"   # () -> Body, or a BackboneEntry

``register_backbone`` registers a loader in code as well. Names that are not registered load as a
local Hugging Face folder or a hub id (``org/name``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fpt_deploy.checkpoint import body_from_checkpoint, is_checkpoint
from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import PluginGroup

ENTRY_POINT_GROUP = "fpt_deploy.backbones"
SEEDED = re.compile(r"^(random-[\w.-]+)@seed(\d+)$")  # a random body drawn with another seed
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name" (a bare "gpt2" is a registered name)


@dataclass(frozen=True, kw_only=True)
class BackboneEntry:
    name: str
    description: str
    source: str  # where its weights come from
    loader: Callable[[], object]  # () -> Body
    origin: str = ""  # the package that registered it: "fpt-deploy 0.1.0", "my-plugin 1.0 (plug-in)"


_REGISTRY: dict[str, BackboneEntry] = {}
_CACHE: dict[str, object] = {}
_PLUGINS = PluginGroup(ENTRY_POINT_GROUP, what="backbone", expects="a loader or a BackboneEntry")


def register_backbone(name: str, description: str, source: str):
    """Decorator: register ``loader`` under ``name``."""

    def wrap(loader):
        _REGISTRY[name] = BackboneEntry(
            name=name, description=description, source=source, loader=loader, origin="registered in code"
        )
        return loader

    return wrap


def _as_entry(name: str, obj, origin: str) -> BackboneEntry | None:
    if isinstance(obj, BackboneEntry):
        return replace(obj, name=name, origin=origin)
    if callable(obj):
        doc = (obj.__doc__ or "").strip().splitlines()
        return BackboneEntry(
            name=name, description=doc[0] if doc else name, source="plug-in loader", loader=obj, origin=origin
        )
    return None


def _register(name: str, entry: BackboneEntry) -> None:
    _REGISTRY.setdefault(name, entry)


def _register_builtin_backbones() -> None:
    hf = importlib.import_module("fpt_deploy.backbones.hf")
    for entry in hf.BUILTIN_BACKBONES:
        _REGISTRY.setdefault(entry.name, replace(entry, origin="fpt-deploy (source tree)"))


def _load_entry_points() -> None:
    _PLUGINS.load_once(_as_entry, _register, _register_builtin_backbones)


def list_backbones() -> list[BackboneEntry]:
    _load_entry_points()
    return list(_REGISTRY.values())


def load_lstm_by_name(name: str, seed: int = 0):
    from fpt_deploy.backbones.lstm import load_lstm_by_name

    return load_lstm_by_name(name, seed)


def load_backbone(name: str):
    """The frozen body registered as ``name``, or loaded from a local Hugging Face folder or a hub id.

    Bodies are cached per process: training several tasks, or exporting, shares one copy.
    """
    _load_entry_points()
    if name not in _CACHE:
        seeded = SEEDED.match(name)
        if name in _REGISTRY:
            body = _REGISTRY[name].loader()
        elif seeded and seeded.group(1) in _REGISTRY:  # random-gpt2@seed1: the same shapes, another init
            body = _REGISTRY[seeded.group(1)].loader(seed=int(seeded.group(2)))
        elif seeded and (lstm := load_lstm_by_name(seeded.group(1), int(seeded.group(2)))) is not None:
            body = lstm
        elif (lstm := load_lstm_by_name(name)) is not None:  # random-lstm-<width>
            body = lstm
        elif is_checkpoint(name):  # a trained body: the paper's Bit-Memory-pretrained start
            body = body_from_checkpoint(name)
        elif Path(name).is_dir():
            from fpt_deploy.backbones.hf import load_local_folder

            body = load_local_folder(Path(name))
        elif HUB_ID.match(name):
            from fpt_deploy.backbones.hf import load_hub_model

            body = load_hub_model(name)
        else:
            known = ", ".join(sorted(_REGISTRY))
            raise UnknownNameError(
                f"unknown backbone {name!r}; choose one of {known}, a local Hugging Face model folder, "
                "or a hub id (org/name)"
            )
        body.name = name
        _CACHE[name] = body
    return _CACHE[name]
