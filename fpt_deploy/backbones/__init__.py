"""Frozen bodies and their registry (``fpt-deploy backbones`` lists them)."""

from fpt_deploy.backbones import hf as _hf  # noqa: F401  (registers the Hugging Face backbones)
from fpt_deploy.backbones.base import Body
from fpt_deploy.backbones.registry import list_backbones, load_backbone, register_backbone

__all__ = ["Body", "list_backbones", "load_backbone", "register_backbone"]
