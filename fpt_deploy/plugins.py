"""Entry points: how tasks and backbones, built-in or from plug-in packages, are found.

fpt-deploy declares its own tasks and backbones as entry points (pyproject.toml); a plug-in package
declares its own the same way, in the groups ``fpt_deploy.tasks`` and ``fpt_deploy.backbones``
(docs/declared-tasks.md, "Plug-ins").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib.metadata import Distribution, EntryPoint, distributions

log = logging.getLogger(__name__)

OWN_DISTRIBUTION = "fpt-deploy"


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


class PluginGroup:
    """The entry points of one group, registered once per process by ``load_once``.

    A registry (tasks, backbones) says how an entry point's object becomes one of its entries
    (``adopt``: the entry, or None when the object is not what the group expects), where an entry goes
    (``register``), and what to import when fpt-deploy's own entry points are missing (``fallback``: a
    source tree used without installing it). A plug-in that fails to load is logged and kept in
    ``broken`` (name -> why), and never takes the group's other entries down.
    """

    def __init__(self, group: str, *, what: str, expects: str) -> None:
        self.group = group
        self.what = what  # "task", "backbone": names the plug-in in warnings
        self.expects = expects  # what an entry point must be; formatted with its {name}
        self.loaded = False
        self.broken: dict[str, str] = {}
        self._lock = threading.RLock()  # an entry point's module may itself ask the registry while it loads

    def load_once(
        self,
        adopt: Callable[[str, object, str], object | None],
        register: Callable[[str, object], None],
        fallback: Callable[[], None],
    ) -> None:
        """Register every entry point once; threads that ask meanwhile wait for the whole group."""
        with self._lock:
            if self.loaded:
                return
            self.loaded = True  # first: a module that asks the registry while it loads does not recurse
            own = False
            for ep, dist in group_entry_points(self.group):
                origin, is_own = origin_of(dist)
                try:
                    entry = adopt(ep.name, ep.load(), origin)
                except Exception as e:  # a broken plug-in must not take the others down
                    self._refuse(
                        ep.name, f"entry point {ep.value!r} of {origin} failed to load: {type(e).__name__}: {e}"
                    )
                    continue
                if entry is None:
                    expected = self.expects.format(name=ep.name)
                    self._refuse(ep.name, f"entry point {ep.value!r} of {origin} is not {expected}")
                    continue
                own = own or is_own
                register(ep.name, entry)
            if not own:
                log.debug(
                    "fpt-deploy's %s entry points are missing (not installed?); using the built-in ones", self.what
                )
                fallback()

    def _refuse(self, name: str, why: str) -> None:
        self.broken[name] = why
        log.warning("%s plug-in %s: %s", self.what, name, why)
