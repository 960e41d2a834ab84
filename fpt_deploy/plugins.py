"""Entry points: how tasks and backbones, built-in or from plug-in packages, are found.

fpt-deploy declares its own tasks and backbones as entry points (pyproject.toml); a plug-in package
declares its own the same way, in the groups ``fpt_deploy.tasks`` and ``fpt_deploy.backbones``
(docs/declared-tasks.md, "Plug-ins").
"""

from __future__ import annotations

from importlib.metadata import Distribution, EntryPoint, distributions

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
