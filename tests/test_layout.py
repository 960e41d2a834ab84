"""The installed layout: one ``fpt_deploy`` namespace, layers that import downwards only, no shadowing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.layers import PACKAGE_DIRS, ROOT, circles, module_graph, package_edges, upward

SHADOWS = {
    # A user's own files with the generic names our folders had before they were namespaced.
    "training.py": "raise SystemExit('the user training.py was imported')\n",
    "export/__init__.py": "raise SystemExit('the user export package was imported')\n",
    "serving.py": "raise SystemExit('the user serving.py was imported')\n",
}


def test_every_import_points_down_the_layers():
    edges = package_edges()
    assert not upward(edges), "imports against the layering:\n" + "\n".join(upward(edges))
    # The check has teeth: the CLI really is above the three packages it calls.
    assert ("top", "fpt_deploy.training") in edges and ("top", "fpt_deploy.serving") in edges


def test_no_module_imports_itself_through_others():
    graph = module_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)
    # The check has teeth: the registries are imported by what they register, and a circle is found.
    assert "fpt_deploy.backbones.registry" in graph["fpt_deploy.checkpoint"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pyproject_lists_every_package_and_maps_every_folder():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {v: k for k, v in PACKAGE_DIRS.items()}
    on_disk = set()
    for folder, package in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((package, *rel)))
    assert set(tool["packages"]) == on_disk


@pytest.fixture
def user_folder(tmp_path) -> Path:
    for rel, text in SHADOWS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_no_top_level_training_export_or_serving_module_is_installed(tmp_path):
    for name in ("training", "export", "serving"):
        done = _run([sys.executable, "-c", f"import {name}"], tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stderr
    done = _run([sys.executable, "-c", "import fpt_deploy.serving, fpt_deploy.export, fpt_deploy.training"], tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_users_own_training_and_export_change_nothing(user_folder):
    code = "import fpt_deploy.training, fpt_deploy.export, fpt_deploy.serving, fpt_deploy.cli; print('ours')"
    done = _run([sys.executable, "-c", code], user_folder)
    assert done.returncode == 0 and done.stdout.strip() == "ours", done.stderr
    done = _run([sys.executable, "-m", "fpt_deploy.cli", "backbones"], user_folder)
    assert done.returncode == 0 and "minilm" in done.stdout, done.stderr


def test_a_users_own_training_changes_nothing_under_torchrun(user_folder):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed (pip install 'fpt-deploy[train]')")
    done = _run([torchrun, "--nproc-per-node", "1", "-m", "fpt_deploy.cli", "backbones"], user_folder)
    assert done.returncode == 0 and "minilm" in done.stdout, done.stderr
