"""Frozen bodies and their registry (``fpt-deploy backbones`` lists them).

Every backbone is registered through the ``fpt_deploy.backbones`` entry points, the built-in ones
included (pyproject.toml); ``fpt_deploy.backbones.registry`` loads them on first use.
"""

from fpt_deploy.backbones.base import Body
from fpt_deploy.backbones.registry import list_backbones, load_backbone, register_backbone

__all__ = ["Body", "list_backbones", "load_backbone", "register_backbone"]
