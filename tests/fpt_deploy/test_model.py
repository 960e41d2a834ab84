"""The FPT model: what trains, what is frozen, how outputs are read."""

from __future__ import annotations

import pytest
import torch

from fpt_deploy.backbones import load_backbone
from fpt_deploy.model import FPT
from fpt_deploy.tasks import get_task

CASES = [
    ("mnist", {}, (10,)),
    ("bit-xor", {}, (5, 2)),
    ("bit-memory", {"n": 20, "patch": 5, "train_size": 4, "test_size": 4}, (20, 2)),
    ("listops", {"max_len": 40, "min_len": 4, "max_depth": 3, "train_size": 4, "test_size": 4}, (10,)),
]


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("name,options,logits", CASES)
def test_exactly_the_paper_parameters_train(backbone, name, options, logits, paper_trainable):
    task = get_task(name, **options)
    model = FPT(task, load_backbone(backbone))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = paper_trainable - ({"input_head.embed.bias"} if task.spec.vocab_size else set())
    assert trainable == expected
    assert all(not p.requires_grad for p in model.body.parameters())
    x = torch.from_numpy(task.load_data("test").inputs[:3])
    out = model(x)
    assert out.shape == (3, *logits)
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.body.parameters())


def test_norms_and_positions_start_from_the_backbone():
    body = load_backbone("tiny-bert")
    model = FPT(get_task("mnist"), body)
    w, b = body.default_norms()
    torch.testing.assert_close(model.norm_weight.detach(), w)
    torch.testing.assert_close(model.norm_bias.detach(), b)
    torch.testing.assert_close(model.input_head.position.detach(), body.default_positions()[:49])


def test_positions_are_extended_beyond_the_backbone():
    body = load_backbone("tiny-bert")  # 128 positions
    model = FPT(get_task("bit-memory", n=300, patch=1, train_size=1, test_size=1), body)  # 1800 tokens
    assert model.input_head.position.shape == (1800, body.hidden_size)


def test_input_layer_is_orthogonal_with_gain_141():
    model = FPT(get_task("mnist"), load_backbone("tiny-bert"))
    w = model.input_head.embed.weight.detach()  # (D, 16): orthonormal columns scaled by 1.41
    torch.testing.assert_close(w.T @ w, 1.41**2 * torch.eye(16), atol=1e-4, rtol=1e-4)


def test_classification_reads_the_last_real_token_under_padding():
    task = get_task("listops", max_len=40, min_len=4, max_depth=3, train_size=4, test_size=4)
    model = FPT(task, load_backbone("tiny-gpt2")).eval()
    ids = torch.from_numpy(task.load_data("test").inputs[:1])
    n = int((ids != 0).sum())
    longer = torch.zeros(1, 40, dtype=torch.long)
    longer[0, :n] = ids[0, :n]
    with torch.no_grad():  # causal body: padding after the last real token cannot change its state
        torch.testing.assert_close(model(ids), model(longer))
        shorter = ids.clone()
        shorter[0, n - 1] = 0
        assert not torch.allclose(model(ids), model(shorter))


@pytest.mark.slow
def test_minilm_mnist_trains_under_two_percent_of_parameters():
    model = FPT(get_task("mnist"), load_backbone("minilm"))
    trainable, total = model.parameter_counts()
    assert trainable / total <= 0.02
    assert trainable * 4 <= 2_000_000  # float32 checkpoint fits in 2 MB
