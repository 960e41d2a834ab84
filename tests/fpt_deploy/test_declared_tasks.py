"""Declared tasks: each input kind from arrays or an image folder, validation, the frozen spec, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fpt_deploy.training import TrainConfig

from fpt_deploy.errors import ConfigError, DataUnavailableError, TaskDataError
from fpt_deploy.tasks import Recipe, get_task
from fpt_deploy.tasks.recipe import resolve_recipe
from fpt_deploy.tasks.sources import stratified_split


def _classes(n: int, k: int, rng) -> np.ndarray:
    return np.arange(n) % k  # every class present, in order, so any stratified split covers them all


def _image_npz(path: Path, n=40, shape=(8, 8), k=2, seed=0, **extra) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, *shape), dtype=np.uint8), y=_classes(n, k, rng), **extra)
    return path


def _sequence_npz(path: Path, n=40, shape=(6, 3), k=3) -> Path:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(n, *shape)) * 10 + 5).astype(np.float32)
    np.savez(path, x=x, y=_classes(n, k, rng))
    return path


def _tokens_npz(path: Path, n=40, length=7, vocab=12, pad=11) -> Path:
    rng = np.random.default_rng(2)
    x = rng.integers(0, vocab - 1, (n, length))  # real ids 0..10; 11 is padding
    lengths = rng.integers(1, length + 1, n)
    x[np.arange(length)[None, :] >= lengths[:, None]] = pad
    np.savez(path, x=x.astype(np.int64), y=(lengths % 2))
    return path


def _bits_npz(path: Path, n=40, length=4) -> Path:
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, (n, length)), rng.integers(0, 2, (n, length))
    np.savez(path, x=np.concatenate([a, b], 1).astype(np.uint8), y=(a ^ b))
    return path


# kind, writer, options, (seq_len, token_dim, vocab_size, logits shape)
KINDS = [
    ("image", _image_npz, {"patch": 4}, (4, 16, 0, (2,))),
    ("sequence", _sequence_npz, {"patch": 2}, (3, 6, 0, (3,))),
    ("sequence", _sequence_npz, {"patch": 3, "standardize": "position"}, (2, 9, 0, (3,))),
    ("tokens", _tokens_npz, {"pad_id": 11}, (7, 0, 12, (2,))),
    ("bits", _bits_npz, {"patch": 2}, (4, 2, 0, (4, 2))),
]


@pytest.mark.parametrize("kind,write,options,expected", KINDS)
def test_each_kind_builds_its_spec_and_tokens(tmp_path, kind, write, options, expected):
    data = write(tmp_path / "d.npz")
    task = get_task("custom", name="t", kind=kind, data=str(data), **options)
    seq_len, token_dim, vocab, logits = expected
    spec = task.spec
    assert (spec.seq_len, spec.token_dim, spec.vocab_size, spec.logits_shape) == (seq_len, token_dim, vocab, logits)
    train, test = task.load_data("train"), task.load_data("test")
    assert len(train.labels) + len(test.labels) == 40 and 6 <= len(test.labels) <= 10  # the seeded 20% split
    assert train.inputs.dtype == np.dtype(spec.input_dtype) and train.inputs.shape[1:] == spec.input_shape
    tokens = task.build_preprocess()(torch.from_numpy(train.inputs[:5]))
    assert tokens.shape[:2] == (5, seq_len) and (vocab or tokens.shape[2] == token_dim)


def test_statistics_come_from_the_training_split_and_standardise_it(tmp_path):
    task = get_task("custom", name="s", kind="sequence", data=str(_sequence_npz(tmp_path / "s.npz")))
    x = torch.from_numpy(task.load_data("train").inputs)
    z = task.build_preprocess()(x)  # (N, 6, 3) with patch 1
    np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(-1, 3).std(0, unbiased=False), 1, atol=1e-4)
    image = get_task("custom", name="i", kind="image", data=str(_image_npz(tmp_path / "i.npz")))
    pixels = image.load_data("train").inputs / 255.0
    assert image.spec.options["fitted"]["mean"] == [pytest.approx(pixels.mean(), abs=1e-6)]


def test_explicit_statistics_replace_the_computed_ones_and_travel_in_the_spec(tmp_path):
    from fpt_deploy.tasks.preprocess import ImagePatches

    data = _image_npz(tmp_path / "rgb.npz", shape=(4, 4, 3))
    spec_file = tmp_path / "rgb.toml"  # ImageNet's statistics, given as a TOML list
    spec_file.write_text(
        'name = "rgb"\nkind = "image"\ndata = "rgb.npz"\npatch = 2\n'
        "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"
    )
    task = get_task("custom", file=str(spec_file))
    fitted = task.spec.options["fitted"]
    assert (fitted["mean"], fitted["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = torch.from_numpy(task.load_data("train").inputs)
    expected = ImagePatches(2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x)
    torch.testing.assert_close(task.build_preprocess()(x), expected)
    again = get_task("rgb", **json.loads(json.dumps(task.options)))  # from a checkpoint's config, no data read
    torch.testing.assert_close(again.build_preprocess()(x), expected)

    one = get_task("custom", name="one", kind="image", data=str(data), mean="0.5", std="0.25")
    assert one.spec.options["fitted"]["mean"] == [0.5] * 3 and one.spec.options["fitted"]["std"] == [0.25] * 3
    seq = get_task("custom", name="seq", kind="sequence", data=str(_sequence_npz(tmp_path / "s.npz")), mean=5, std=10)
    z = seq.build_preprocess()(torch.from_numpy(seq.load_data("train").inputs))
    torch.testing.assert_close(z, (torch.from_numpy(seq.load_data("train").inputs) - 5) / 10)


def test_padding_id_becomes_the_masked_id_and_rows_read_their_last_real_token(tmp_path):
    task = get_task("custom", name="tok", kind="tokens", data=str(_tokens_npz(tmp_path / "t.npz")), pad_id=11)
    x = torch.tensor([[0, 5, 11, 11, 11, 11, 11]])
    ids = task.build_preprocess()(x)
    assert ids.tolist() == [[11, 5, 0, 0, 0, 0, 0]]  # 0 and the pad id swap places: 0 is what the head masks


def test_image_folder_labels_come_from_folder_names(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    task = get_task(
        "custom", name="pets", kind="image", data=str(tmp_path / "train"), test_data=str(tmp_path / "test"), patch=2
    )
    assert task.spec.labels == ("cat", "dog") and task.spec.input_shape == (4, 6, 3)
    assert task.spec.seq_len == 6 and task.spec.token_dim == 12
    assert task.load_data("test").labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_the_frozen_spec_rebuilds_the_task_without_the_data(tmp_path):
    data = _image_npz(tmp_path / "d.npz", labels=np.array(["no", "yes"]))
    task = get_task("custom", name="frozen", kind="image", data=str(data))
    stored = json.loads(json.dumps(task.options))  # what a checkpoint's config.json holds
    data.unlink()
    again = get_task("frozen", **stored)
    assert again.spec == task.spec and again.spec.labels == ("no", "yes")
    x = torch.from_numpy(task.load_data("test").inputs)
    torch.testing.assert_close(again.build_preprocess()(x), task.build_preprocess()(x))
    with pytest.raises(DataUnavailableError, match="is gone"):
        again.load_data("test")


def test_a_task_file_declares_the_task_with_paths_relative_to_it(tmp_path):
    (tmp_path / "data").mkdir()
    _image_npz(tmp_path / "data" / "d.npz")
    spec_file = tmp_path / "my.toml"
    spec_file.write_text('name = "mine"\nkind = "image"\ndata = "data/d.npz"\npatch = 2\n[recipe]\nlr = 0.01\n')
    config = TrainConfig(task_file=spec_file, steps=1)
    assert config.task == "mine" and config.out == Path("runs") / "mine"
    task = get_task(config.task, **config.task_options)
    assert task.name == "mine" and task.spec.seq_len == 16 and task.recipe == Recipe(lr=0.01)
    resolved = config.with_recipe(task.recipe)
    assert (resolved.lr, resolved.steps, resolved.schedule) == (0.01, 1, "cosine")


def test_recipes_fill_only_what_the_user_left_unset():
    mnist = get_task("mnist").recipe
    assert resolve_recipe({}, mnist) == {"lr": 3e-3, "epochs": 6, "steps": None, "schedule": "cosine"}
    assert resolve_recipe({"lr": 1e-4}, mnist)["lr"] == 1e-4
    assert resolve_recipe({}, None) == {"lr": 1e-3, "epochs": 3, "steps": None, "schedule": "cosine"}
    assert resolve_recipe({"epochs": 2}, Recipe(steps=100))["steps"] is None  # asked for passes, not steps
    with pytest.raises(ConfigError, match="recipe lr must be > 0"):
        Recipe(lr=0)


def test_stratified_split_keeps_every_class_on_both_sides_and_repeats():
    y = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, test = stratified_split(y, 0.2, seed=5)
    assert set(y[train]) == set(y[test]) == {0, 1, 2}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    again = stratified_split(y, 0.2, seed=5)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()


def _bad_npz(path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(12, 5, 1)).astype(np.float32)
    x[3, 0, 0] = np.nan
    x_test = np.ones((4, 5, 1), np.float32)
    y_test = np.array([0, 0, 1, 7])
    np.savez(path, x=x, y=np.arange(12) % 3, x_test=x_test, y_test=y_test, labels=np.array(["a", "b", "c"]))
    return path


def test_every_problem_is_listed_in_one_error(tmp_path):
    with pytest.raises(TaskDataError) as e:
        get_task("custom", name="bad", kind="sequence", data=str(_bad_npz(tmp_path / "b.npz")), patch=2)
    message = str(e.value)
    for part in ("NaN or inf", "patch 2 does not divide the sequence length 5; patches that do: 1, 5", "found 7"):
        assert part in message, message
    assert "\n" not in message and message.startswith("task 'bad': 3 problem(s)")


BAD_CASES = [  # writer options, declaration, expected fragment
    ({"shape": (28, 28)}, {"patch": 5}, "patches that do: 1, 2, 4, 7, 14, 28"),
    ({"k": 1}, {}, "at least 2 classes"),
    ({}, {"labels": "a,b,c"}, "class(es) 'c' have no training example"),
    ({}, {"name": "mnist"}, "taken by a registered task"),
    ({}, {"kind": "video"}, "unknown kind 'video'"),
    ({}, {"patch": "four"}, "option patch='four' must be"),
    ({}, {"bogus": 1}, "unknown option(s) bogus"),
    ({"shape": (28, 28)}, {"patch": 1, "max_positions": 128}, "784 tokens an example exceed the backbone's 128"),
    ({}, {"mean": "0.1307"}, "give mean and std together"),
    ({}, {"mean": "0.5", "std": "0"}, "std '0' must be greater than 0"),
    ({}, {"mean": "nan", "std": "0.3"}, "mean 'nan' must be finite"),
    ({}, {"mean": "half", "std": "0.3"}, "mean 'half' must be numbers"),
    ({}, {"mean": "0.4,0.5,0.6", "std": "0.3"}, "mean has 3 values but the data have 1 channel(s); give 1"),
]


@pytest.mark.parametrize("write,declaration,fragment", BAD_CASES)
def test_bad_declarations_are_refused_before_training(tmp_path, write, declaration, fragment):
    data = _image_npz(tmp_path / "d.npz", **write)
    options = {"name": "t", "kind": "image", "data": str(data), **declaration}
    with pytest.raises((TaskDataError, ConfigError), match="problem") as e:
        get_task("custom", **options)
    assert fragment in str(e.value)


def test_image_data_that_is_not_uint8_or_has_mismatched_splits_is_refused(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(
        path,
        x=np.zeros((6, 4, 4), np.float32),
        y=np.arange(6) % 2,
        x_test=np.zeros((2, 4, 5), np.uint8),
        y_test=np.array([0, 1]),
    )
    with pytest.raises(TaskDataError) as e:
        get_task("custom", name="f", kind="image", data=str(path), patch=2)
    assert "must be uint8" in str(e.value) and "held-out ones [4, 5]" in str(e.value)


def test_tokens_with_padding_inside_a_row_are_refused(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, x=np.array([[1, 0, 2], [3, 4, 0], [0, 0, 0], [1, 2, 3]] * 3), y=np.array([0, 1, 0, 1] * 3))
    with pytest.raises(TaskDataError) as e:
        get_task("custom", name="t", kind="tokens", data=str(path))
    assert "padding (id 0) before a real token" in str(e.value) and "padding only" in str(e.value)


def test_a_declaration_named_like_a_registered_task_is_refused_not_mistaken_for_it(tmp_path):
    data = _image_npz(tmp_path / "d.npz")
    with pytest.raises(TaskDataError, match="'mnist' is taken by a registered task"):
        get_task("mnist", kind="image", data=str(data))  # as a task file naming itself "mnist" arrives


def test_threads_that_ask_while_the_registry_loads_see_every_task(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from fpt_deploy.tasks import registry

    with registry.TASKS.scratch(), ThreadPoolExecutor(8) as pool:
        registry.TASKS.reset()
        seen = list(pool.map(lambda _: registry.is_registered("mnist"), range(8)))
    assert seen == [True] * 8
