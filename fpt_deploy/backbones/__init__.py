"""Frozen bodies and their registry (``fpt-deploy backbones`` lists them).

Every backbone is registered through the ``fpt_deploy.backbones`` entry points, the built-in ones
included (pyproject.toml); ``fpt_deploy.backbones.registry`` loads them on first use. The names below
load on first use, so the registry imports without torch.
"""

from fpt_deploy.lazy import lazy_exports

_EXPORTS = {
    "Body": "base",
    "BackboneEntry": "registry",
    "list_backbones": "registry",
    "load_backbone": "registry",
    "register_backbone": "registry",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
