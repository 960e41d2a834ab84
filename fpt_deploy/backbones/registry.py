"""Backbone registry: a name maps to a loader that returns a frozen ``Body`` (``fpt_deploy.plugins.Registry``).

Every backbone is an entry point of the group ``fpt_deploy.backbones`` (fpt-deploy's own are declared
in pyproject.toml); a plug-in package declares its own the same way::

    [project.entry-points."fpt_deploy.backbones"]
    my-bert = "my_package.backbones:load_my_bert"   # () -> Body, or a BackboneEntry

``register_backbone`` registers a loader in code as well. An entry with ``matches`` stands for a
family of names (``random-lstm-<width>``, a checkpoint folder, a local Hugging Face folder, a hub id):
a name that no entry has is offered to those in the order of their names (``checkpoint`` before
``hf-folder``: a checkpoint is a folder too). Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import Registry

ENTRY_POINT_GROUP = "fpt_deploy.backbones"
SEEDED = re.compile(r"^(random-[\w.-]+)@seed(\d+)$")  # a random body drawn with another seed


@dataclass(frozen=True, kw_only=True)
class BackboneEntry:
    name: str
    description: str
    source: str  # where its weights come from
    loader: Callable[..., object]  # () -> Body; (name) -> Body for an entry with ``matches``
    matches: Callable[[str], bool] | None = None  # the names it loads besides its own
    origin: str = ""  # the package that registered it: "fpt-deploy 0.1.0", "my-plugin 1.0 (plug-in)"

    def load(self, name: str):
        return self.loader(name) if self.matches is not None else self.loader()


def _adopt(name: str, obj: object, origin: str) -> BackboneEntry | None:
    if isinstance(obj, BackboneEntry):
        return replace(obj, name=name, origin=origin)
    if callable(obj):
        doc = (obj.__doc__ or "").strip().splitlines()
        return BackboneEntry(
            name=name, description=doc[0] if doc else name, source="plug-in loader", loader=obj, origin=origin
        )
    return None


BACKBONES: Registry[BackboneEntry] = Registry(
    ENTRY_POINT_GROUP, what="backbone", expects="a loader or a BackboneEntry", adopt=_adopt
)
_CACHE: dict[str, object] = {}


def register_backbone(name: str, description: str, source: str):
    """Decorator: register ``loader`` under ``name``."""

    def wrap(loader):
        entry = BackboneEntry(name=name, description=description, source=source, loader=loader)
        BACKBONES.register(name, entry, origin="registered in code")
        return loader

    return wrap


def list_backbones() -> list[BackboneEntry]:
    return [e.value for e in BACKBONES.entries()]


def _entry_for(name: str) -> BackboneEntry:
    found = BACKBONES.find(name)
    if found is not None and (found.value.matches is None or found.value.matches(name)):
        return found.value
    for entry in sorted(list_backbones(), key=lambda e: e.name):
        if entry.matches is not None and entry.matches(name):
            return entry
    if name in BACKBONES.broken:
        raise UnknownNameError(f"backbone {name!r} is unavailable: {BACKBONES.broken[name]}")
    fixed = ", ".join(sorted(e.name for e in list_backbones() if e.matches is None))
    raise UnknownNameError(
        f"unknown backbone {name!r}; choose one of {fixed}, a checkpoint folder, a local Hugging Face model "
        "folder, or a hub id (org/name)"
    )


def load_backbone(name: str):
    """The frozen body registered as ``name``, or loaded by the family that ``matches`` it.

    Bodies are cached per process: training several tasks, or exporting, shares one copy.
    """
    if name not in _CACHE:
        seeded = SEEDED.match(name)
        if seeded:  # random-gpt2@seed1: the shapes of random-gpt2, another initialisation
            base, seed = seeded.group(1), int(seeded.group(2))
            entry = _entry_for(base)
            body = entry.loader(base, seed=seed) if entry.matches is not None else entry.loader(seed=seed)
        else:
            body = _entry_for(name).load(name)
        body.name = name
        _CACHE[name] = body
    return _CACHE[name]
