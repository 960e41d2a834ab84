"""Task registry, generated data, preprocessing shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpt_deploy.errors import ConfigError, DataUnavailableError, UnknownNameError
from fpt_deploy.tasks import get_task, list_tasks, parse_options
from fpt_deploy.tasks.listops import TOKEN_ID, VOCAB, evaluate

CASES = [  # task, options, tokens, values per token (0 = token ids)
    ("bit-xor", {}, 10, 1),
    ("bit-memory", {"n": 100, "patch": 10, "train_size": 8, "test_size": 8}, 60, 10),
    ("bit-memory", {"train_size": 4, "test_size": 4}, 120, 50),  # the paper's n=1000, patch 50
    ("mnist", {}, 49, 16),
    ("listops", {"max_len": 64, "min_len": 4, "train_size": 16, "test_size": 16}, 64, 0),
]


def test_registry_has_the_paper_tasks():
    names = {t.name for t in list_tasks()}
    assert {"bit-memory", "bit-xor", "listops", "mnist", "cifar10", "cifar10-lra"} <= names


@pytest.mark.parametrize("name,options,tokens,values", CASES)
def test_preprocessing_gives_the_paper_shapes(name, options, tokens, values):
    task = get_task(name, **options)
    data = task.load_data("test")
    assert data.inputs.dtype == np.dtype(task.spec.input_dtype)
    assert data.inputs.shape[1:] == task.spec.input_shape
    x = task.build_preprocess()(torch.from_numpy(data.inputs[:4]))
    assert x.shape[:2] == (4, tokens) and task.spec.seq_len == tokens
    if values:
        assert x.shape[2] == values == task.spec.token_dim
    labels_per_example = 1 if data.labels.ndim == 1 else data.labels.shape[1]
    assert labels_per_example == task.spec.num_outputs


def test_bit_xor_labels_are_the_xor():
    data = get_task("bit-xor").load_data("train")
    np.testing.assert_array_equal(data.labels, data.inputs[:, :5] ^ data.inputs[:, 5:])


def test_bit_memory_query_is_a_masked_copy_of_one_string():
    task = get_task("bit-memory", n=20, patch=5, train_size=50, test_size=5)
    data = task.load_data("train")
    strings, query = data.inputs[:, :100].reshape(50, 5, 20), data.inputs[:, 100:]
    shown = query != 2
    assert 0.3 < shown.mean() < 0.7
    for s, q, show, y in zip(strings, query, shown, data.labels, strict=True):
        assert any((row == y).all() for row in s)
        np.testing.assert_array_equal(q[show], y[show])


def test_generated_train_and_test_differ_and_repeat():
    task = get_task("bit-memory", n=20, patch=5, train_size=20, test_size=20)
    a, b = task.load_data("train"), task.load_data("test")
    assert not np.array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.inputs, task.load_data("train").inputs)


def test_listops_labels_evaluate_the_expression():
    task = get_task("listops", max_len=64, min_len=4, train_size=30, test_size=1)
    data = task.load_data("train")
    for ids, label in zip(data.inputs, data.labels, strict=True):
        tokens = [VOCAB[i] for i in ids if i]
        stack = [[]]
        for t in tokens:
            if t.startswith("["):
                stack.append([t])
            elif t == "]":
                op, *vals = stack.pop()
                stack[-1].append(evaluate(op, vals))
            else:
                stack[-1].append(int(t))
        assert stack == [[label]]
    assert TOKEN_ID["<pad>"] == 0 and len(VOCAB) == task.spec.vocab_size


def test_mnist_embedded_split_is_disjoint_and_balanced():
    task = get_task("mnist")
    train, test = task.load_data("train"), task.load_data("test")
    assert len(train.labels) == 4000 and len(test.labels) == 1000
    assert np.bincount(test.labels).tolist() == [100] * 10
    train_rows = {r.tobytes() for r in train.inputs}
    assert not any(r.tobytes() in train_rows for r in test.inputs)
    assert "embedded" in train.source


def test_cifar_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        get_task("cifar10").load_data("train")
    with pytest.raises(DataUnavailableError, match="could not be read"):
        get_task("cifar10-lra").load_data("train", data_dir=tmp_path)


def test_unknown_task_and_bad_options_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ConfigError, match="no option bogus"):
        get_task("bit-xor", bogus=1)
    with pytest.raises(ConfigError, match="multiple of patch"):
        get_task("bit-memory", n=101, patch=10)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["n100"])
    assert parse_options(["n=100", "patch = 10"]) == {"n": "100", "patch": "10"}
