"""Atomic writes: all or nothing, and files readable as a plain write would leave them."""

from __future__ import annotations

import os
import stat

import pytest

from fpt_deploy.atomic import replace_dir, write_text


def test_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a.json"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    write_text(path, "old")

    def boom(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(tmp_path / "d", boom)
    assert not (tmp_path / "d").exists()
    replace_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_text("1"))
    with pytest.raises(RuntimeError):
        replace_dir(tmp_path / "d", boom)
    assert (tmp_path / "d" / "f").read_text() == "1"
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) & 0o055  # group/other can read the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]
