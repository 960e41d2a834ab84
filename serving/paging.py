"""Every task's rows on disk, for servers that keep only some in memory (``serve --max-resident-tasks``).

``ServingModel`` writes a task's rows (norms and heads) here once, when it loads the task. When the
task's rows have been evicted, its next batch reads them back from here: one ``pread`` of a fixed-size
record. The repository's ``.npz`` files are never parsed again. So a task keeps serving the version it
was loaded with, whatever later happens to the repository's files (a load after a new export reloads
it), and a miss costs one read of the task's rows rather than opening two archives.

The file is unlinked as soon as it is made, so nothing is left behind, even after a crash. Its pages
live in the kernel's page cache, which the kernel reclaims under memory pressure; they are not part of
the server's resident memory.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from fpt_deploy.errors import ArtifactError


class RowSpill:
    """Named float32 rows of each task, one record a task, in an unlinked temporary file."""

    def __init__(self, directory: Path | None = None) -> None:
        self._file, self.folder = _temporary_file(directory)
        self._records: dict[str, tuple[int, int, list[tuple[str, tuple[int, ...]]]]] = {}  # offset, size, layout
        self._free: dict[int, list[int]] = {}  # record size -> offsets of dropped records
        self._end = 0
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        """Where the file is, for messages (it has no name left on disk)."""
        return f"an unlinked file in {self.folder}"

    def put(self, name: str, rows: dict[str, np.ndarray]) -> None:
        """Store ``rows`` (any shapes, written as float32) as ``name``'s record, replacing an older one."""
        layout = [(key, tuple(a.shape)) for key, a in rows.items()]
        data = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in rows.values())
        with self._lock:
            self._drop(name)
            free = self._free.get(len(data))
            if free:
                offset = free.pop()
            else:
                offset, self._end = self._end, self._end + len(data)
            try:
                written = os.pwrite(self._file.fileno(), data, offset)
            except OSError as e:
                raise ArtifactError(
                    f"cannot write task {name!r}'s rows to {self.path} ({e}); free disk space there, or serve "
                    "without --max-resident-tasks"
                ) from e
            if written != len(data):
                raise ArtifactError(f"short write of task {name!r}'s rows to {self.path}; free disk space there")
            self._records[name] = (offset, len(data), layout)

    def get(self, name: str) -> dict[str, np.ndarray]:
        """``name``'s rows as ``put`` stored them (read-only arrays over one read)."""
        with self._lock:
            offset, size, layout = self._records[name]
        data = os.pread(self._file.fileno(), size, offset)
        if len(data) != size:
            raise ArtifactError(f"{self.path} returned {len(data)} of task {name!r}'s {size} bytes")
        rows, at = {}, 0
        for key, shape in layout:
            n = int(np.prod(shape))
            rows[key] = np.frombuffer(data, np.float32, n, at).reshape(shape)
            at += 4 * n
        return rows

    def drop(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        record = self._records.pop(name, None)
        if record is not None:
            offset, size, _ = record
            self._free.setdefault(size, []).append(offset)

    def close(self) -> None:
        self._file.close()


def _temporary_file(directory: Path | None):
    """(file, folder): an unlinked file in ``directory`` when it is writable, else in the temporary folder."""
    for where in (directory, Path(tempfile.gettempdir())):
        if where is None or not os.access(where, os.W_OK):
            continue
        try:
            return tempfile.TemporaryFile(prefix="fpt-rows-", dir=where), where
        except OSError:
            continue
    raise ArtifactError("cannot create a file for task rows; set TMPDIR to a writable folder")
