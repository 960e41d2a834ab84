"""RowSpill: every task's rows in one unlinked file, read back exactly as written."""

from __future__ import annotations

import os

import numpy as np
from fpt_deploy.serving.paging import RowSpill


def test_rows_come_back_as_written_and_dropped_records_are_reused(tmp_path):
    spill = RowSpill(tmp_path)
    try:
        rng = np.random.default_rng(0)
        rows = {
            f"t{i}": {"a": rng.standard_normal((3, 4), dtype=np.float32), "b": np.full(5, i, np.float32)}
            for i in range(4)
        }
        for name, r in rows.items():
            spill.put(name, r)
        assert os.listdir(tmp_path) == []  # unlinked: nothing is left on disk, even after a crash
        for name, r in rows.items():
            got = spill.get(name)
            assert list(got) == ["a", "b"]
            for key in r:
                np.testing.assert_array_equal(got[key], r[key])
        end = spill._end
        spill.drop("t1")
        spill.put("t9", rows["t1"])  # same size: takes the dropped record's place
        assert spill._end == end
        spill.put("t0", {"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float32)})  # replaced
        np.testing.assert_array_equal(spill.get("t0")["a"], 1)
        np.testing.assert_array_equal(spill.get("t2")["b"], 2)  # neighbours untouched
    finally:
        spill.close()


def test_an_unwritable_folder_falls_back_to_the_temporary_folder(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        spill = RowSpill(locked)
        if os.access(locked, os.W_OK):  # running as root: the folder is writable anyway
            assert spill.folder == locked
        else:
            assert spill.folder != locked
        spill.put("t", {"a": np.arange(3, dtype=np.float32)})
        np.testing.assert_array_equal(spill.get("t")["a"], [0, 1, 2])
        spill.close()
    finally:
        locked.chmod(0o700)
