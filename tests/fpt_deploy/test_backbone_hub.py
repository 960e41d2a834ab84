"""``--backbone org/name``: a Hugging Face hub id, loaded from the local cache (its on-disk layout)."""

from __future__ import annotations

import json

import pytest
import torch

from fpt_deploy.backbones import load_backbone
from fpt_deploy.backbones.hf import TINY_BERT_CONFIG, body_from_hf
from fpt_deploy.errors import BackboneUnavailableError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache, model_id: str):
    """The folder the hub cache keeps ``model_id``'s files in (refs/main -> snapshots/<revision>)."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return repo / "snapshots" / REVISION


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_loads_from_the_cache(hub_cache):
    import transformers

    torch.manual_seed(3)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT_CONFIG)).eval()
    model.save_pretrained(_snapshot(hub_cache, "acme/tiny-bert-hub"))
    body = load_backbone("acme/tiny-bert-hub")
    assert body.fingerprint() == body_from_hf(model).fingerprint() and body.name == "acme/tiny-bert-hub"


def test_an_id_that_is_not_cached_is_named_in_the_error(hub_cache):
    with pytest.raises(BackboneUnavailableError, match="'acme/not-there'.*HF_HUB_OFFLINE"):
        load_backbone("acme/not-there")


def test_an_unsupported_architecture_is_refused_before_its_weights(hub_cache):
    snapshot = _snapshot(hub_cache, "acme/t5-ish")
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(BackboneUnavailableError, match="'t5' model; supported architectures: bert, roberta, gpt2"):
        load_backbone("acme/t5-ish")
