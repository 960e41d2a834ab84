"""What trains (``--train``), the reference's other model options, and a trained body's own fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpt_deploy.backbones import load_backbone
from fpt_deploy.checkpoint import load_checkpoint, save_checkpoint
from fpt_deploy.errors import ConfigError
from fpt_deploy.model import FPT, ModelOptions
from fpt_deploy.tasks import get_task

XOR = {"train_size": 64, "test_size": 32}

GROUP_CASES = [  # (train, parameter-name prefixes that must train)
    (("output",), {"output_head."}),
    (("output", "norms"), {"output_head.", "norm_"}),
    (("output", "norms", "input"), {"output_head.", "norm_", "input_head.embed"}),
    (("input", "positions", "norms", "output"), {"output_head.", "norm_", "input_head."}),
    (("attention",), {"body.blocks.0.qkv", "body.blocks.1.qkv", "body.blocks.0.attn_out", "body.blocks.1.attn_out"}),
    (("feedforward", "output"), {"body.blocks.0.ff_", "body.blocks.1.ff_", "output_head."}),
    (("all",), {"output_head.", "norm_", "input_head.", "body."}),
]


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("train,prefixes", GROUP_CASES)
def test_exactly_the_named_groups_train(backbone, train, prefixes):
    shared = load_backbone(backbone)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    model = FPT(get_task("mnist"), shared, ModelOptions(train=train))
    for name, p in model.named_parameters():
        assert p.requires_grad == any(name.startswith(x) for x in prefixes), name
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.from_numpy(get_task("mnist").load_data("test").inputs[:4])).sum().backward()
    opt.step()
    # the shared (cached) body never changes: a body group trains a copy
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items())
    assert (model.body is shared) == (not ModelOptions(train=train).trains_body)


def test_checkpoint_keeps_untrained_task_tensors_and_records_the_groups(tmp_path):
    task, body = get_task("bit-xor", **XOR), load_backbone("tiny-bert")
    torch.manual_seed(3)
    model = FPT(task, body, ModelOptions(train=("output",), input_gain=0.5, dropout=0.1))
    save_checkpoint(tmp_path / "ck", model, task, "tiny-bert", {})
    torch.manual_seed(99)  # a different init: the stored input layer must win
    loaded, _, config = load_checkpoint(tmp_path / "ck")
    assert config["model"]["train"] == ["output"] and config["model"]["dropout"] == 0.1
    torch.testing.assert_close(loaded.input_head.embed.weight, model.input_head.embed.weight)
    assert not loaded.input_head.embed.weight.requires_grad and loaded.output_head.linear.weight.requires_grad


def test_trained_body_gets_its_own_fingerprint_and_reloads(tmp_path):
    task, base = get_task("bit-xor", **XOR), load_backbone("tiny-gpt2")
    model = FPT(task, base, ModelOptions(train=("all",)))
    with torch.no_grad():
        model.body.blocks[0].qkv.weight.add_(0.01)  # what a training step does to the body
    save_checkpoint(tmp_path / "ck", model, task, "tiny-gpt2", {})
    loaded, _, config = load_checkpoint(tmp_path / "ck")
    assert config["base_fingerprint"] == base.fingerprint() != config["fingerprint"]
    assert loaded.body.fingerprint() == config["fingerprint"]
    torch.testing.assert_close(loaded.body.blocks[0].qkv.weight, model.body.blocks[0].qkv.weight)
    # and it serves as the body of a later run (the paper's Bit-Memory-pretrained start)
    reused = load_backbone(str(tmp_path / "ck"))
    assert reused.fingerprint() == config["fingerprint"]
    assert not any(p.requires_grad for p in reused.parameters())


def test_model_options_report_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        ModelOptions(train=("bogus",), dropout=1.5, input_hidden_layers=-1)
    assert "bogus" in str(e.value) and "dropout" in str(e.value) and "hidden" in str(e.value)


def test_hidden_head_layers_train_but_block_export():
    model = FPT(
        get_task("mnist"), load_backbone("tiny-bert"), ModelOptions(input_hidden_layers=1, output_hidden_layers=2)
    )
    assert len(model.input_head.hidden) == 3 and len(model.output_head.hidden) == 6
    assert model(torch.from_numpy(get_task("mnist").load_data("test").inputs[:2])).shape == (2, 10)
    assert model.input_head.hidden[2].weight.requires_grad
    assert any("hidden layers" in b for b in model.export_blockers())
    assert FPT(get_task("mnist"), load_backbone("tiny-bert")).export_blockers() == []


def test_input_gain_sets_the_orthogonal_scale():
    model = FPT(get_task("mnist"), load_backbone("tiny-bert"), ModelOptions(input_gain=0.7))
    w = model.input_head.embed.weight.detach()
    torch.testing.assert_close(w.T @ w, 0.49 * torch.eye(w.shape[1]), atol=1e-4, rtol=1e-4)


def test_dropout_acts_in_training_only():
    task = get_task("mnist")
    x = torch.from_numpy(task.load_data("test").inputs[:2])
    model = FPT(task, load_backbone("tiny-bert"), ModelOptions(dropout=0.5)).train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_attention_maps_are_probabilities_and_leave_the_output_alone():
    task = get_task("bit-xor", **XOR)
    model = FPT(task, load_backbone("tiny-gpt2")).eval()
    x = torch.from_numpy(task.load_data("test").inputs[:3])
    hidden, mask = model.input_head(x)
    w, b = model.norm_weight.expand(3, -1, -1), model.norm_bias.expand(3, -1, -1)
    maps = model.body.attention_maps(hidden, mask, w, b)
    assert len(maps) == 2 and maps[0].shape == (3, 4, 10, 10)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(3, 4, 10))
    assert torch.all(maps[0][..., 0, 1:] == 0)  # GPT-2 is causal: the first token sees only itself
    torch.testing.assert_close(model.body(hidden, mask, w, b), model.body(hidden, mask, w, b))


@pytest.mark.parametrize("n,strings,patch", [(5, 2, 1), (8, 3, 4)])
def test_bit_xor_with_n_strings_and_patches(n, strings, patch):
    task = get_task("bit-xor", n=n, strings=strings, patch=patch, **XOR)
    data = task.load_data("train")
    assert data.inputs.shape == (64, strings * n) and task.spec.seq_len == strings * n // patch
    expected = np.bitwise_xor.reduce(data.inputs.reshape(64, strings, n), axis=1)
    np.testing.assert_array_equal(data.labels, expected)
    model = FPT(task, load_backbone("tiny-bert"))
    assert model(torch.from_numpy(data.inputs[:2])).shape == (2, n, 2)
