"""CIFAR-style augmentation: random crop after 4-pixel zero padding and horizontal flip, seeded per step."""

from __future__ import annotations

import pytest
import torch
from fpt_deploy.training.augment import check_augmentable, random_crop_flip

from fpt_deploy.errors import ConfigError


def test_each_image_is_a_shifted_possibly_flipped_window_of_itself():
    x = torch.randint(1, 255, (6, 8, 8, 3), dtype=torch.uint8)
    y = random_crop_flip(x, seed=0, step=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (4, 4, 4, 4)).permute(0, 2, 3, 1)  # (B, 16, 16, C)
    for i in range(6):
        windows = [padded[i, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(1)) for w in windows)
    torch.testing.assert_close(random_crop_flip(x, seed=0, step=3), y)  # a resumed run replays it
    assert not torch.equal(random_crop_flip(x, seed=0, step=4), y)


def test_grey_images_and_only_images():
    x = torch.randint(0, 255, (2, 28, 28), dtype=torch.uint8)
    assert random_crop_flip(x, seed=1, step=0).shape == (2, 28, 28)
    check_augmentable((28, 28), "mnist")
    with pytest.raises(ConfigError, match="crops and flips images"):
        check_augmentable((10,), "bit-xor")


def test_rotation_turns_each_image_by_at_most_twenty_degrees_and_replays():
    from fpt_deploy.training.augment import augment_images, random_rotation

    x = torch.zeros(4, 9, 9, dtype=torch.uint8)
    x[:, 4, :] = 200  # a horizontal bar through the centre
    y = random_rotation(x, seed=0, step=1)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert set(y.unique().tolist()) <= {0, 200}  # nearest pixel: no new values
    assert y[:, 4, 4].eq(200).all()  # the centre stays
    assert not torch.equal(y, x)  # turned
    assert y[:, 0].eq(0).all() and y[:, -1].eq(0).all()  # by at most 20 degrees: the bar never reaches the edge rows
    torch.testing.assert_close(random_rotation(x, seed=0, step=1), y)
    assert torch.equal(random_rotation(x, seed=0, step=1, degrees=0), x)
    assert augment_images(x, seed=0, step=1).shape == x.shape
