"""A runtime's rewritten copy of a portable file, kept on disk so that a server start makes it once.

``cached_rewrite(source, rewrite)`` yields the file to load: the rewritten copy, or ``source`` itself
when nothing applies or the rewrite fails (a slower server, never a broken one). Copies live in a
``.cache/`` folder next to the source, named by a key over the source's sha256, the rewrite's name
and its ``key`` (rewrite version, library versions), with a JSON record beside each. When that folder
cannot be written (a read-only repository), the user's cache folder (``$XDG_CACHE_HOME/fpt-deploy``,
default ``~/.cache/fpt-deploy``) is used, and when that fails too, a temporary file that lives only
while the context is open. Every file is written atomically (a temporary file renamed into place);
a record whose copy is missing or does not match its checksum is rebuilt.

A writer killed mid-rewrite (SIGKILL, a power cut) leaves its temporary copy behind, as large as the
backbone. Each copy's temporary file names its writer (``.<copy>.<random>.pid<pid>@<host>.tmp``), and
every ``cached_rewrite`` first removes the temporary files of its cache folders whose writer is gone:
a process of this host that no longer runs, or, for another host's files and unnamed ones, any not
modified for ``STALE_TEMP_S``. A live writer's file (another server starting beside this one) is kept.

Outcomes that depend only on the inputs are remembered too: "nothing to rewrite" and "refused by the
parity check" are recorded without a copy, so they are not retried on every start; a rewrite that
failed (a crash, a timeout) is retried next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fpt_deploy.artifacts import sha256_file
from fpt_deploy.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"  # beside the source file
RECORD_FORMAT = "fpt-deploy-rewrite/1"
# A temporary file not modified for this long has no writer: a rewrite runs at most 15 minutes
# (ort_rewrite's child timeout), and its parity check follows right after it writes the copy.
STALE_TEMP_S = 3600.0
_WRITER = re.compile(r"\.pid(\d+)@([A-Za-z0-9._-]+)\.tmp$")


class RewriteRefused(Exception):
    """The rewritten copy disagrees with its source: the source is served instead (and this is remembered)."""


@dataclass(frozen=True, kw_only=True)
class Rewrite:
    """One runtime's rewrite of a file: ``apply(source, target)`` writes ``target`` and returns what it
    changed (counts by kind), or None when nothing applies (nothing written). It raises ``RewriteRefused``
    when the copy fails its check, anything else when it fails."""

    name: str  # short, file-name safe: "ort"
    key: str  # everything besides the source the output depends on: rewrite version, library versions
    apply: Callable[[Path, Path], dict[str, int] | None]


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fpt-deploy"


@dataclass(frozen=True)
class _Slot:
    """Where one (source, rewrite) pair's copy and record live."""

    copy: Path
    record: Path

    @classmethod
    def beside(cls, source: Path, rewrite: Rewrite, key: str) -> _Slot:
        base = source.parent / CACHE_DIR / f"{source.name}.{rewrite.name}-{key[:16]}"
        return cls(base.with_name(base.name + ".onnx"), base.with_name(base.name + ".json"))

    @classmethod
    def in_user_cache(cls, rewrite: Rewrite, key: str) -> _Slot:
        base = user_cache_dir() / "rewrites" / f"{rewrite.name}-{key[:32]}"
        return cls(base.with_name(base.name + ".onnx"), base.with_name(base.name + ".json"))


def _cache_key(source_sha256: str, rewrite: Rewrite) -> str:
    return hashlib.sha256(f"{source_sha256}\0{rewrite.name}\0{rewrite.key}".encode()).hexdigest()


def _read(slot: _Slot, source_sha256: str, rewrite: Rewrite) -> dict | None:
    """The slot's record when it is complete and matches (its copy verified), else None."""
    try:
        record = json.loads(slot.record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if record.get("source_sha256") != source_sha256 or record.get("key") != rewrite.key:
        return None
    if record.get("outcome") == "rewritten":
        try:
            if sha256_file(slot.copy) != record.get("sha256"):
                log.warning("cached rewrite %s is corrupt; rebuilding it", slot.copy)
                return None
        except OSError:
            return None
    return record


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _writer_temp(path: Path):
    """A temporary path beside ``path`` that names this process; on success it replaces ``path``."""
    return atomic_path(path, tag=f".pid{os.getpid()}@{_host()}")


def _writer_gone(path: Path, now: float) -> bool:
    """Whether the temporary file ``path`` was left by a writer that no longer runs."""
    try:
        if now - path.stat().st_mtime > STALE_TEMP_S:
            return True
    except FileNotFoundError:
        return False  # its writer just renamed or removed it
    m = _WRITER.search(path.name)
    if m is None or m[2] != _host():
        return False  # unnamed (a record's) or another host's: only its age tells
    pid = int(m[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def remove_stale_temps(folder: Path) -> int:
    """Remove the temporary files in ``folder`` whose writer is gone (see the module); how many."""
    now, removed, freed = time.time(), 0, 0
    try:
        candidates = list(folder.glob(".*.tmp"))
    except OSError:
        return 0
    for path in candidates:
        if not _writer_gone(path, now):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue  # gone already, or not ours to remove (a read-only folder)
        removed, freed = removed + 1, freed + size
    if removed:
        log.info("removed %d temporary file(s) (%.1f MB) left by stopped rewrites in %s", removed, freed / 1e6, folder)
    return removed


def _write(slot: _Slot, source: Path, source_sha256: str, rewrite: Rewrite) -> dict:
    """Run the rewrite into ``slot``; the record written. OSError when the slot's folder is not writable."""
    record = {"format": RECORD_FORMAT, "source": source.name, "source_sha256": source_sha256, "key": rewrite.key}
    try:
        with _writer_temp(slot.copy) as tmp:
            try:
                changes = rewrite.apply(source, tmp)
            except RewriteRefused as e:
                log.warning("%s rewrite of %s refused (%s); running the plain graph", rewrite.name, source, e)
                changes, record["outcome"], record["reason"] = None, "refused", str(e)
            if changes is None:
                raise _NoCopy
            record.update(outcome="rewritten", changes=changes, sha256=sha256_file(tmp))
    except _NoCopy:
        record.setdefault("outcome", "unchanged")
    write_text(slot.record, json.dumps(record, indent=2, sort_keys=True) + "\n")
    _remove_stale(slot)
    return record


class _NoCopy(Exception):
    """Internal: the rewrite wrote nothing, so the atomic copy is dropped."""


def _remove_stale(slot: _Slot) -> None:
    """Drop other copies of the same source in the same folder (made by an older rewrite or source)."""
    if slot.copy.parent.name != CACHE_DIR:
        return  # the user cache is shared by many sources: keyed by content only, never swept here
    prefix = slot.copy.name.rsplit("-", 1)[0] + "-"
    for path in slot.copy.parent.glob(prefix + "*"):
        if path not in (slot.copy, slot.record):
            path.unlink(missing_ok=True)


@contextmanager
def cached_rewrite(source: Path, rewrite: Rewrite) -> Iterator[Path]:
    """The file to load for ``source``: its cached rewritten copy (made now if needed), or ``source``.

    Load it inside the context: a copy that could only go to a temporary folder is deleted on exit.
    """
    source = Path(source)
    try:
        source_sha256 = sha256_file(source)
    except OSError:
        yield source  # a missing file: the runtime's own load says what is wrong
        return
    key = _cache_key(source_sha256, rewrite)
    slots = [_Slot.beside(source, rewrite, key), _Slot.in_user_cache(rewrite, key)]
    for slot in slots:
        if slot.copy.parent.is_dir():
            remove_stale_temps(slot.copy.parent)
    for slot in slots:
        record = _read(slot, source_sha256, rewrite)
        if record is not None:
            log.info("%s: %s rewrite from cache %s", source.name, rewrite.name, slot.record.parent)
            yield slot.copy if record["outcome"] == "rewritten" else source
            return
    with tempfile.TemporaryDirectory(prefix="fpt-rewrite-") as tmp:
        slots.append(_Slot(Path(tmp) / "copy.onnx", Path(tmp) / "record.json"))
        yield _build(source, source_sha256, rewrite, slots)


def _build(source: Path, source_sha256: str, rewrite: Rewrite, slots: list[_Slot]) -> Path:
    for i, slot in enumerate(slots):
        try:
            record = _write(slot, source, source_sha256, rewrite)
        except OSError as e:
            if i + 1 < len(slots) and _unwritable(e):
                log.warning(
                    "cannot write the %s rewrite cache in %s (%s); trying %s",
                    rewrite.name,
                    slot.copy.parent,
                    e.strerror or e,
                    slots[i + 1].copy.parent,
                )
                continue
            return _failed(source, rewrite, e)
        except Exception as e:  # noqa: BLE001  (the rewrite is an optimisation: any failure keeps the plain graph)
            return _failed(source, rewrite, e)
        return slot.copy if record["outcome"] == "rewritten" else source
    raise AssertionError("the temporary slot is always writable or fails above")


def _unwritable(e: OSError) -> bool:
    import errno

    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _failed(source: Path, rewrite: Rewrite, e: Exception) -> Path:
    log.warning("%s rewrite of %s failed (%s: %s); running the plain graph", rewrite.name, source, type(e).__name__, e)
    return source
