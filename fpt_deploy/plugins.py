"""The one registry: tasks, backbones, input kinds and runtimes, built-in or from plug-in packages.

Each kind of thing is a ``Registry`` over one entry-point group. fpt-deploy declares its own entries
ONCE, as entry points in pyproject.toml; a plug-in package declares its own the same way::

    [project.entry-points."fpt_deploy.tasks"]
    my-task = "my_package.tasks:MyTask"

    fpt_deploy.tasks      a Task subclass whose ``name`` is the entry's name
    fpt_deploy.backbones  a BackboneEntry, or a loader () -> Body
    fpt_deploy.kinds      an InputKind subclass (the input kinds of declared tasks)
    fpt_deploy.runtimes   a Runtime subclass (``fpt-deploy serve --runtime NAME``)

Names are known without importing anything (``names()``); an entry's module is imported when the entry
is first asked for, so listing the runtimes never imports CUDA. A plug-in that fails to load, or that
is not what its group expects, is logged and kept in ``broken`` (name -> why) and never takes the
group's other entries down. ``register`` adds an entry in code (scripts, tests); it wins over an entry
point of the same name.

A source tree used without installing it has no entry points: the registry then reads the same
declarations from the tree's pyproject.toml. Torch-free.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import Distribution, EntryPoint, distributions
from pathlib import Path
from typing import Generic, TypeVar

from fpt_deploy.errors import UnknownNameError

log = logging.getLogger(__name__)

OWN_DISTRIBUTION = "fpt-deploy"
SOURCE_TREE_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
T = TypeVar("T")


def group_entry_points(group: str) -> list[tuple[EntryPoint, Distribution]]:
    """``(entry point, distribution)`` of ``group`` across every installed distribution, first one per name.

    Unlike ``importlib.metadata.entry_points``, a stale copy of a distribution's metadata (an old
    ``*.egg-info`` in the working folder) does not hide the installed one's entry points.
    """
    seen, out = set(), []
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == group and ep.name not in seen:
                seen.add(ep.name)
                out.append((ep, dist))
    return out


def origin_of(dist: Distribution) -> tuple[str, bool]:
    """``("name version", is_own)``: where an entry point comes from, and whether it is fpt-deploy's own."""
    name = dist.metadata["Name"] or "an unknown package"
    own = name.replace("_", "-").lower() == OWN_DISTRIBUTION
    return (f"{name} {dist.version}" if own else f"{name} {dist.version} (plug-in)"), own


def source_tree_entry_points(group: str, pyproject: Path = SOURCE_TREE_PYPROJECT) -> list[EntryPoint]:
    """The entry points pyproject.toml declares for ``group`` (a source tree that was never installed)."""
    if not pyproject.is_file():
        return []
    declared = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get(group, {})
    return [EntryPoint(name, value, group) for name, value in declared.items()]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its name, the object itself, and where it came from."""

    name: str
    value: T
    origin: str  # "fpt-deploy 0.1.0", "my-plugin 1.2 (plug-in)", "registered in code (my_module)"


class Registry(Generic[T]):
    """Names -> entries of one kind, from the entry points of ``group`` and from ``register``.

    ``adopt(name, obj, origin)`` turns what an entry point (or ``register``) gives into the registered
    value, or returns None when ``obj`` is not what the group expects (``expects`` says what is, with
    the entry's ``{name}``).
    """

    def __init__(self, group: str, *, what: str, expects: str, adopt: Callable[[str, object, str], T | None]) -> None:
        self.group = group
        self.what = what  # "task", "backbone", "input kind", "runtime": names it in messages
        self.expects = expects
        self._adopt = adopt
        self.broken: dict[str, str] = {}  # name -> why it did not load
        self._pending: dict[str, tuple[EntryPoint, str]] = {}  # name -> (entry point, origin), not imported yet
        self._entries: dict[str, Entry[T]] = {}
        self._order: list[str] = []  # names as found: fpt-deploy's own first
        self._in_code: set[str] = set()  # registered with ``register``
        self._discovered = False
        self._lock = threading.RLock()  # an entry's module may itself ask the registry while it loads

    # -- finding -------------------------------------------------------------------------------------
    def _discover(self) -> None:
        with self._lock:
            if self._discovered:
                return
            self._discovered = True  # first: a module that asks the registry while it loads does not recurse
            found = [(ep, *origin_of(dist)) for ep, dist in group_entry_points(self.group)]
            found.sort(key=lambda f: not f[2])  # fpt-deploy's own first, each package's in its own order
            if not any(own for _, _, own in found):
                log.debug("fpt-deploy's %s entry points are missing (not installed?); reading pyproject", self.what)
                names = {ep.name for ep, _, _ in found}
                found += [
                    (ep, "fpt-deploy (source tree)", True)
                    for ep in source_tree_entry_points(self.group)
                    if ep.name not in names
                ]
            for ep, origin, _ in found:
                if ep.name not in self._entries:  # registered in code: that one wins
                    self._pending[ep.name] = (ep, origin)
                    self._note(ep.name)

    def _note(self, name: str) -> None:
        if name not in self._order:
            self._order.append(name)

    def _load(self, name: str) -> None:
        """Import the entry point ``name`` (once); a failure goes to ``broken``."""
        with self._lock:
            if name not in self._pending:
                return
            ep, origin = self._pending.pop(name)
            try:
                value = self._adopt(name, ep.load(), origin)
            except Exception as e:  # a broken plug-in must not take the others down
                self._refuse(name, f"entry point {ep.value!r} of {origin} failed to load: {type(e).__name__}: {e}")
                return
            if value is None:
                self._refuse(name, f"entry point {ep.value!r} of {origin} is not {self.expects.format(name=name)}")
                return
            self._entries[name] = Entry(name, value, origin)

    def _refuse(self, name: str, why: str) -> None:
        self.broken[name] = why
        log.warning("%s plug-in %s: %s", self.what, name, why)

    # -- asking --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every name, fpt-deploy's own first, without importing any entry's module."""
        self._discover()
        with self._lock:
            return [n for n in self._order if n not in self.broken]

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> Entry[T]:
        """The entry ``name`` (its module imported now); UnknownNameError names the choices, or why it broke."""
        self._discover()
        self._load(name)
        if name in self._entries:
            return self._entries[name]
        if name in self.broken:
            raise UnknownNameError(f"{self.what} {name!r} is unavailable: {self.broken[name]}")
        raise UnknownNameError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.names())}")

    def find(self, name: str) -> Entry[T] | None:
        """The entry ``name``, or None when there is none (or it is broken)."""
        self._discover()
        self._load(name)
        return self._entries.get(name)

    def entries(self) -> list[Entry[T]]:
        """Every entry that loads, in ``names()`` order (each module imported now)."""
        for name in self.names():
            self._load(name)
        return [self._entries[n] for n in self.names() if n in self._entries]

    def register(self, name: str, obj: object, *, origin: str = "registered in code") -> T:
        """Add ``obj`` under ``name`` in code; TypeError when it is not what the group expects."""
        value = self._adopt(name, obj, origin)
        if value is None:
            raise TypeError(f"{self.what} {name!r} must be {self.expects.format(name=name)}, got {obj!r}")
        with self._lock:
            self._pending.pop(name, None)
            self.broken.pop(name, None)
            self._entries[name] = Entry(name, value, origin)
            self._in_code.add(name)
            self._note(name)
        return value

    def reset(self) -> None:
        """Read the entry points again on the next question (tests); what ``register`` added stays."""
        with self._lock:
            self._discovered = False
            self._pending.clear()
            self._entries = {n: e for n, e in self._entries.items() if n in self._in_code}
            self._order = [n for n in self._order if n in self._in_code]
            self.broken.clear()

    @contextmanager
    def scratch(self) -> Iterator[Registry[T]]:
        """Within it, what is registered or read is forgotten afterwards (tests)."""
        with self._lock:
            saved = (self._discovered, dict(self._pending), dict(self._entries), list(self._order))
            saved += (set(self._in_code), dict(self.broken))
        try:
            yield self
        finally:
            with self._lock:
                self._discovered, self._pending, self._entries, self._order, self._in_code, self.broken = saved
