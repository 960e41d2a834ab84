"""The one registry (fpt_deploy/plugins.py): built-ins from pyproject, plug-ins, broken ones, in-code ones."""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint
from types import SimpleNamespace

import pytest

from fpt_deploy import plugins
from fpt_deploy.errors import UnknownNameError
from fpt_deploy.plugins import Registry, source_tree_entry_points
from tests.layers import ROOT

GROUPS = ("fpt_deploy.tasks", "fpt_deploy.backbones", "fpt_deploy.kinds", "fpt_deploy.runtimes")


def _registry(**kwargs) -> Registry:
    adopt = lambda name, obj, origin: obj if isinstance(obj, type) and issubclass(obj, Exception) else None  # noqa: E731
    return Registry("fpt_deploy.test-group", what="thing", expects="an Exception subclass", adopt=adopt, **kwargs)


def _with_entry_points(monkeypatch, *eps: EntryPoint, package: str = "my-plugin") -> None:
    dist = SimpleNamespace(metadata={"Name": package}, version="1.0")
    found = plugins.group_entry_points
    monkeypatch.setattr(
        plugins, "group_entry_points", lambda group: found(group) + [(ep, dist) for ep in eps if ep.group == group]
    )


def test_every_built_in_is_declared_once_in_pyproject_and_registered_from_there():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    from fpt_deploy.serving.runtimes import RUNTIMES

    from fpt_deploy.backbones.registry import BACKBONES
    from fpt_deploy.tasks.kinds import KINDS
    from fpt_deploy.tasks.registry import TASKS

    for group, registry in zip(GROUPS, (TASKS, BACKBONES, KINDS, RUNTIMES), strict=True):
        assert set(declared[group]) <= set(registry.names()), group
        assert [ep.name for ep in source_tree_entry_points(group)] == list(declared[group])
    assert {"ort", "ort-cuda", "tensorrt", "torch"} <= set(declared["fpt_deploy.runtimes"])


def test_a_source_tree_that_was_never_installed_reads_pyproject(monkeypatch):
    monkeypatch.setattr(plugins, "group_entry_points", lambda group: [])
    from fpt_deploy.tasks.registry import TASKS

    with TASKS.scratch():
        TASKS.reset()
        assert "bit-xor" in TASKS.names()
        assert TASKS.get("bit-xor").origin == "fpt-deploy (source tree)"


def test_a_plug_in_that_fails_to_load_is_reported_and_the_others_still_load(monkeypatch):
    good = EntryPoint("good", "builtins:KeyError", "fpt_deploy.test-group")
    missing = EntryPoint("missing", "no_such_module_anywhere:Thing", "fpt_deploy.test-group")
    wrong = EntryPoint("wrong", "builtins:len", "fpt_deploy.test-group")
    _with_entry_points(monkeypatch, good, missing, wrong)
    registry = _registry()
    assert registry.names() == ["good", "missing", "wrong"]  # names come without importing anything
    assert registry.get("good").value is KeyError and registry.get("good").origin == "my-plugin 1.0 (plug-in)"
    with pytest.raises(UnknownNameError, match="thing 'missing' is unavailable: .*ModuleNotFoundError"):
        registry.get("missing")
    with pytest.raises(UnknownNameError, match="'wrong' is unavailable: .* is not an Exception subclass"):
        registry.get("wrong")
    assert [e.name for e in registry.entries()] == ["good"] and set(registry.broken) == {"missing", "wrong"}
    with pytest.raises(UnknownNameError, match="unknown thing 'other'; choose one of good"):
        registry.get("other")


def test_a_runtime_whose_module_does_not_import_is_unavailable_not_fatal(monkeypatch):
    from fpt_deploy.serving.runtimes import RUNTIMES, runtime_class, runtime_names

    broken = EntryPoint("broken-rt", "no_such_runtime_module:Runtime", "fpt_deploy.runtimes")
    _with_entry_points(monkeypatch, broken)
    with RUNTIMES.scratch():
        RUNTIMES.reset()
        assert runtime_names()[:3] == ["ort", "ort-cuda", "tensorrt"] and "broken-rt" in runtime_names()
        with pytest.raises(UnknownNameError, match="runtime 'broken-rt' is unavailable: .*no_such_runtime_module"):
            runtime_class("broken-rt")
        assert runtime_class("ort").name == "ort" and "broken-rt" not in runtime_names()


def test_registered_in_code_wins_and_survives_a_reset(monkeypatch):
    _with_entry_points(monkeypatch, EntryPoint("same", "builtins:KeyError", "fpt_deploy.test-group"))
    registry = _registry()
    registry.register("same", ValueError, origin="registered in code (test)")
    registry.reset()
    assert registry.get("same").value is ValueError
    with pytest.raises(TypeError, match="must be an Exception subclass"):
        registry.register("bad", object)


def test_an_input_kind_registers_like_a_task():
    from fpt_deploy.tasks.kinds import KINDS, ImageKind, get_kind, kind_names, register_kind

    assert kind_names()[:4] == ["bits", "image", "sequence", "tokens"]
    with KINDS.scratch():

        @register_kind
        class Wide(ImageKind):
            name = "wide-image"

        assert isinstance(get_kind("wide-image"), Wide)
    assert "wide-image" not in kind_names()


def test_a_backbone_family_loads_names_no_entry_has(tmp_path):
    from fpt_deploy.backbones.registry import _entry_for

    assert _entry_for("random-lstm-64").name == "random-lstm"
    assert _entry_for("org/model").name == "hf-hub"
    assert _entry_for(str(tmp_path)).name == "hf-folder"
    with pytest.raises(UnknownNameError, match="unknown backbone 'nope'; choose one of .*tiny-bert"):
        _entry_for("nope")
