"""CIFAR-style augmentation of raw image batches: random crop after zero padding, horizontal flip, rotation.

The reference code trains CIFAR-10 with these three (torchvision's RandomCrop(32, padding=4),
RandomHorizontalFlip and RandomRotation(20)); ``augment_images`` applies them in that order. Here they
act on the raw uint8 batch before the input head, so what the model sees at serving time (an unaugmented
image) is unchanged. Draws come from a generator seeded by (seed, step), so a resumed run replays them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpt_deploy.errors import ConfigError

PAD = 4
ROTATION = 20.0  # degrees either way, the reference's RandomRotation(20)


def check_augmentable(input_shape: tuple[int, ...], task: str) -> None:
    """Only images, (H, W) or (H, W, C), can be cropped and flipped."""
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"--augment crops and flips images; task {task!r} has inputs of shape {input_shape}")


def random_crop_flip(x: torch.Tensor, seed: int, step: int, pad: int = PAD) -> torch.Tensor:
    """(B, H, W[, C]) -> same shape: each image shifted by up to ``pad`` pixels (zeros fill) and flipped
    left-right with probability 1/2."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    channels_last = x.dim() == 4
    img = x if channels_last else x.unsqueeze(-1)  # (B, H, W, C)
    B, H, W, _ = img.shape
    padded = F.pad(img.permute(0, 3, 1, 2), (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B)[:, None, None, None]
    chan = torch.arange(img.shape[-1])[None, :, None, None]
    out = padded[batch, chan, rows, cols]  # (B, C, H, W)
    flip = torch.rand(B, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    out = out.permute(0, 2, 3, 1)  # (B, H, W, C)
    return (out if channels_last else out.squeeze(-1)).contiguous()


def random_rotation(x: torch.Tensor, seed: int, step: int, degrees: float = ROTATION) -> torch.Tensor:
    """(B, H, W[, C]) uint8 -> same shape: each image turned about its centre by an angle drawn uniform in
    +-``degrees`` (nearest pixel, zeros fill, as torchvision's RandomRotation)."""
    if not degrees:
        return x
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    channels_last = x.dim() == 4
    img = (x if channels_last else x.unsqueeze(-1)).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    theta = (torch.rand(x.shape[0], generator=g) * 2 - 1) * degrees * torch.pi / 180  # (B,)
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(affine, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out = out.round().to(x.dtype).permute(0, 2, 3, 1)  # (B, H, W, C)
    return (out if channels_last else out.squeeze(-1)).contiguous()


def augment_images(x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """``--augment``: the reference's CIFAR-10 training transforms, crop, flip, then rotation."""
    return random_rotation(random_crop_flip(x, seed, step), seed, step)
