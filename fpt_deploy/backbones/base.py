"""The frozen body shared by every task, and its fingerprint.

A body holds the attention and feed-forward weights of a pretrained transformer, frozen. Its
normalisation layers have no weights of their own: every row of a batch brings its task's scale and
bias (``norm_weight``, ``norm_bias`` of shape (B, N_norm, D)), so one call serves a batch that mixes
tasks (docs/architecture.md, "The body contract"). The pretrained norm values and position embeddings are
kept as buffers only to initialise new tasks.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABCMeta, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_per_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with a scale and bias per batch row: x (B, L, D), weight/bias (B, D)."""
    x = F.layer_norm(x, x.shape[-1:], eps=eps)
    return x * weight[:, None, :] + bias[:, None, :]


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout that is no op at all (nothing traced into an export) when ``p`` is 0."""
    return F.dropout(x, p) if p else x


def multi_head_attention(
    x: torch.Tensor,
    qkv: nn.Linear,
    heads: int,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
    record: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; ``qkv`` projects D -> 3D; ``mask`` (B, 1, L|1, L) bool, True = attend.

    ``record``, when given, receives this layer's attention probabilities (B, H, L, L); the softmax is
    then computed explicitly (``Body.attention_maps``), otherwise by the fused kernel.
    """
    B, L, D = x.shape
    q, k, v = qkv(x).split(D, dim=-1)  # 3 x (B, L, D)
    q, k, v = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    if record is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, L, Dh)
    else:
        scores = (q @ k.transpose(-1, -2)) / (D // heads) ** 0.5  # (B, H, L, L)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        record.append(probs.detach())
        y = dropout(probs, dropout_p) @ v
    return y.transpose(1, 2).reshape(B, L, D)


class TransformerBlock(nn.Module):
    """One block's frozen weights: fused query/key/value, attention output, and the feed-forward pair.

    BERT and GPT-2 bodies hold the same weights per block; they differ in where the norms sit (``forward``).
    """

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ff_in = nn.Linear(d, ff)
        self.ff_out = nn.Linear(ff, d)


class Body(nn.Module, metaclass=ABCMeta):
    """Frozen transformer blocks. Subclasses set the attributes below and implement ``forward``."""

    architecture: str  # "bert" or "gpt2"
    hidden_size: int
    num_norms: int  # N_norm: how many (scale, bias) pairs a task owns
    norm_names: list[str]  # one name per norm row, for humans and exporters
    max_positions: int

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}
        self.dropout = 0.0  # embedding/residual/attention dropout while training (the reference's; off by default)
        self._attention_record: list[torch.Tensor] | None = None

    def _register_pretrained(self, d: int) -> None:
        """Buffers for the pretrained norms (``num_norms`` rows) and positions (``max_positions`` rows), width ``d``."""
        self.register_buffer("pretrained_norm_weight", torch.ones(self.num_norms, d))
        self.register_buffer("pretrained_norm_bias", torch.zeros(self.num_norms, d))
        self.register_buffer("pretrained_positions", torch.zeros(self.max_positions, d))

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def group_of(self, name: str) -> str:
        """The trained-parameter group of one of this body's parameters (``fpt_deploy.model``)."""
        return "attention" if ".qkv." in name or ".attn_out." in name else "feedforward"

    def export_blockers(self) -> list[str]:
        """Why this body cannot be exported under the backbone ONNX contract (empty: it can)."""
        return []

    @torch.no_grad()
    def attention_maps(self, hidden, attention_mask, norm_weight, norm_bias) -> list[torch.Tensor]:
        """Each layer's attention probabilities, (B, H, L, L) per layer, for the same inputs as ``forward``."""
        self._attention_record = record = []
        try:
            self(hidden, attention_mask, norm_weight, norm_bias)
        finally:
            self._attention_record = None
        return record

    @abstractmethod
    def forward(
        self,
        hidden: torch.Tensor,  # (B, L, D) float
        attention_mask: torch.Tensor,  # (B, L) int64, 1 = real token
        norm_weight: torch.Tensor,  # (B, N_norm, D)
        norm_bias: torch.Tensor,  # (B, N_norm, D)
    ) -> torch.Tensor:  # (B, L, D)
        """The frozen blocks on (B, L, D) inputs, each row normalised with its own task's parameters."""

    def default_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretrained norm scales and biases, (N_norm, D) each: a new task starts from these."""
        return self.pretrained_norm_weight, self.pretrained_norm_bias

    def default_positions(self) -> torch.Tensor:
        """The pretrained position embeddings (P, D), with any constant additive term folded in."""
        return self.pretrained_positions

    def freeze(self) -> Body:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def fingerprint(self) -> str:
        """sha256 of the architecture config and every frozen tensor: equal only for the same body."""
        if any(p.requires_grad for p in self.parameters()):
            self.__dict__.pop("_fingerprint", None)  # a body in training changes: never cache its hash
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
            for name, tensor in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            cached = h.hexdigest()
            if not any(p.requires_grad for p in self.parameters()):
                self._fingerprint = cached
        return cached
