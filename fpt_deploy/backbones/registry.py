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
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fpt_deploy.checkpoint import body_from_checkpoint, is_checkpoint
from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import group_entry_points, origin_of

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fpt_deploy.backbones"
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
_entry_points_loaded = False
_LOADING = threading.RLock()  # an entry point's module may itself ask the registry while it loads


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


def _load_entry_points() -> None:
    """Register every entry point once; threads that ask meanwhile wait for the whole registry."""
    global _entry_points_loaded
    with _LOADING:
        if not _entry_points_loaded:
            _entry_points_loaded = True  # first: a module that asks the registry while it loads does not recurse
            _register_entry_points()


def _register_entry_points() -> None:
    own = False
    for ep, dist in group_entry_points(ENTRY_POINT_GROUP):
        origin, is_own = origin_of(dist)
        try:
            entry = _as_entry(ep.name, ep.load(), origin)
        except Exception as e:  # a broken plug-in must not take the other backbones down
            log.warning("backbone plug-in %s (%s) failed to load: %s: %s", ep.name, origin, type(e).__name__, e)
            continue
        if entry is None:
            log.warning("backbone plug-in %s (%s) is neither a loader nor a BackboneEntry", ep.name, origin)
            continue
        own = own or is_own
        _REGISTRY.setdefault(ep.name, entry)
    if not own:  # a source tree used without installing it: its entry points are not declared anywhere
        hf = importlib.import_module("fpt_deploy.backbones.hf")
        for entry in hf.BUILTIN_BACKBONES:
            _REGISTRY.setdefault(entry.name, replace(entry, origin="fpt-deploy (source tree)"))


def list_backbones() -> list[BackboneEntry]:
    _load_entry_points()
    return list(_REGISTRY.values())


def load_lstm_by_name(name: str):
    from fpt_deploy.backbones.lstm import load_lstm_by_name

    return load_lstm_by_name(name)


def load_backbone(name: str):
    """The frozen body registered as ``name``, or loaded from a local Hugging Face folder or a hub id.

    Bodies are cached per process: training several tasks, or exporting, shares one copy.
    """
    _load_entry_points()
    if name not in _CACHE:
        if name in _REGISTRY:
            body = _REGISTRY[name].loader()
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
