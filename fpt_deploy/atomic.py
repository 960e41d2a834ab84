"""Atomic file writes (temp file in the same folder + fsync + rename): a reader never sees half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, tag: str = ""):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    ``tag`` goes into the temporary file's name before ``.tmp`` (who writes it, for a later clean-up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f"{tag}.tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the permissions open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (for libraries that write files themselves)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def replace_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a whole folder beside ``path`` with ``fill(tmp_dir)``, then swap it in.

    The old folder is renamed aside before the new one takes its place, so at every instant ``path``
    is either the old complete folder or the new complete one (or, for a moment, absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: readable by a server running as another user
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
