"""Concurrent writers of one deployment repository: every export lands, a killed writer frees the lock."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fpt_deploy.artifacts import (
    LOCK,
    MANIFEST,
    manifest_update,
    open_repository,
    repository_lock,
    task_file,
    write_json,
)
from fpt_deploy.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.concurrent_export import export_concurrently  # noqa: E402

# A child that takes the repository lock, says so on stdout, then waits for stdin (or to be killed).
_HOLDER = textwrap.dedent(
    """
    import sys
    from fpt_deploy.artifacts import repository_lock
    with repository_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def _hold_lock(root) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_waits_for_the_lock_and_says_what_to_do(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(ArtifactError, match="locked by another writer.*run this one again"):
            with repository_lock(tmp_path, timeout=0.2):
                pass
    finally:
        holder.communicate("done\n")
    with repository_lock(tmp_path, timeout=5):  # released by a clean exit
        assert (tmp_path / LOCK).exists()


def test_a_killed_writer_releases_the_lock(tmp_path):
    holder = _hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with repository_lock(tmp_path, timeout=5):
        pass


def _add_task_as_an_export_does(root: Path, name: str, barrier) -> None:
    """Write a task's folder, then list it in one repository transaction (as export_task)."""
    art = dataclasses.replace(open_repository(root).tasks["vec"], name=name)
    write_json(root / task_file(name), art.to_json())
    barrier.wait()  # every writer reaches the manifest at the same moment
    with manifest_update(root) as repo:
        repo.tasks[name] = art


def test_eight_processes_listing_tasks_at_the_same_moment_all_land(tmp_path):
    """Without the lock most of these updates are lost (1 or 2 of 8 land); with it, all do."""
    from tests.serving.conftest import build_synthetic_repo

    root = build_synthetic_repo(tmp_path / "repo")
    names = [f"task{i}" for i in range(8)]
    fork = multiprocessing.get_context("fork")  # the children touch no torch state: json and files only
    barrier = fork.Barrier(len(names))
    procs = [fork.Process(target=_add_task_as_an_export_does, args=(root, n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(names)
    assert set(open_repository(root).tasks) == {"vec", "vec2", "tok", *names}


def test_a_transaction_that_raises_leaves_the_manifest_as_it_was(tmp_path):
    from tests.serving.conftest import build_synthetic_repo

    root = build_synthetic_repo(tmp_path / "repo")
    before = (root / MANIFEST).read_bytes()
    with pytest.raises(RuntimeError, match="midway"):
        with manifest_update(root) as repo:
            repo.tasks.pop("vec")
            raise RuntimeError("midway")
    assert (root / MANIFEST).read_bytes() == before
    inode = (root / MANIFEST).stat().st_ino
    with manifest_update(root) as repo:  # unchanged: not rewritten (a rewrite is a rename: a new inode)
        pass
    assert (root / MANIFEST).stat().st_ino == inode
    with manifest_update(root) as repo:
        repo.tasks.pop("vec")
    assert set(open_repository(root).tasks) == {"vec2", "tok"}


@pytest.mark.slow  # two real export processes: about a minute on two cores
def test_concurrent_exports_of_different_tasks_all_land_and_serve(tiny_checkpoints, tmp_path):
    """Two exports of different tasks at once: both exit 0 and the manifest lists both tasks.

    bench/concurrent_export.py runs the same (its ``export_concurrently``) with more processes, many times.
    """
    from fpt_deploy.serving import ServeConfig, ServingModel

    repo = tmp_path / "deploy"
    for done in export_concurrently(tiny_checkpoints, repo):
        assert done.returncode == 0, done.stderr[-3000:]
    listed = open_repository(repo)
    assert set(listed.tasks) == set(tiny_checkpoints)
    assert len(listed.backbones) == 1  # the one body, exported once and reused by the other writer
    model = ServingModel(ServeConfig(repo=repo, threads=1))
    try:
        assert set(model.tasks) == set(tiny_checkpoints)
    finally:
        model.close()
