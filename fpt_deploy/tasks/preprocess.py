"""Parameter-free preprocessing modules shared by tasks; they run in training and in the input ONNX."""

from __future__ import annotations

import torch
from torch import nn


class ImagePatches(nn.Module):
    """uint8 images (B, H, W) or (B, H, W, C) -> scaled, normalised patches (B, H/p * W/p, p*p*C).

    ``grey`` first converts RGB to one channel (ITU-R 601 weights), as CIFAR-10 LRA does.
    """

    def __init__(self, patch: int, mean: tuple[float, ...], std: tuple[float, ...], grey: bool = False) -> None:
        super().__init__()
        self.patch, self.grey = patch, grey
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.register_buffer("grey_weights", torch.tensor([0.299, 0.587, 0.114]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(-1)  # (B, H, W, 1)
        if self.grey:
            x = (x * self.grey_weights).sum(-1, keepdim=True)
        x = (x - self.mean) / self.std  # (B, H, W, C)
        B, H, W, C = x.shape
        p = self.patch
        x = x.reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)


class BitPatches(nn.Module):
    """uint8 bits (B, N) in {0, 1} (2 = masked) -> (B, N/p, p) values in {-1, +1} (0 = masked)."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = torch.where(x > 1.5, torch.zeros_like(x), x * 2 - 1)
        return x.reshape(x.shape[0], -1, self.patch)


class TokenIds(nn.Module):
    """Token ids pass through as int64 (the input head embeds them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class SequencePatches(nn.Module):
    """float32 sequences (B, T, F) or (B, T) -> standardised patches (B, T/p, p*F).

    ``mean`` and ``std`` are the training split's statistics, shaped (F,) (one per feature, pooled
    over steps: time series) or (T, F) (one per step and feature: tabular rows).
    """

    def __init__(self, patch: int, mean: list, std: list) -> None:
        super().__init__()
        self.patch = patch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 2:
            x = x.unsqueeze(-1)  # (B, T, 1)
        x = (x - self.mean) / self.std  # (B, T, F)
        B, T, F = x.shape
        return x.reshape(B, T // self.patch, self.patch * F)


class PaddedTokenIds(nn.Module):
    """int64 ids (B, T) padded with ``pad_id`` -> ids padded with 0, the id the input head masks.

    Ids 0 and ``pad_id`` swap places: a bijection, so the learned embedding table loses nothing.
    """

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        if self.pad_id == 0:
            return x
        pad, zero = x == self.pad_id, x == 0
        return torch.where(pad, torch.zeros_like(x), torch.where(zero, torch.full_like(x, self.pad_id), x))
