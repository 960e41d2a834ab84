"""The Frozen Pretrained Transformer (Lu et al. 2021): per-task heads around one frozen body.

    raw input -> InputHead (preprocess, Linear|Embedding, + positions) -> Body (frozen; norms per task)
              -> OutputHead (last token(s) -> Linear) -> logits

What trains (paper section 2, Table 15), and nothing else: the input layer, the positional
embeddings, every norm layer's scale and bias, and the output layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fpt_deploy.backbones.base import Body
from fpt_deploy.tasks.base import Task, TaskSpec


def _task_positions(body: Body, length: int) -> torch.Tensor:
    """Positions for ``length`` tokens from the body's pretrained ones, tiled when a task needs more."""
    pretrained = body.default_positions()  # (P, D)
    reps = -(-length // pretrained.shape[0])
    return pretrained.repeat(reps, 1)[:length].clone()  # (length, D)


class InputHead(nn.Module):
    """Raw task input -> (hidden (B, L, D), attention_mask (B, L) int64)."""

    def __init__(self, task: Task, body: Body) -> None:
        super().__init__()
        spec, d = task.spec, body.hidden_size
        self.preprocess = task.build_preprocess()
        if spec.vocab_size:
            self.embed = nn.Embedding(spec.vocab_size, d)
        else:
            self.embed = nn.Linear(spec.token_dim, d)
            nn.init.orthogonal_(self.embed.weight, gain=1.41)  # paper's input-layer init
            nn.init.zeros_(self.embed.bias)
        self.position = nn.Parameter(_task_positions(body, spec.seq_len))  # (L, D)
        self.pad_id = 0 if spec.vocab_size else None

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(raw)  # (B, L, F) float or (B, L) ids
        hidden = self.embed(x) + self.position[: x.shape[1]]  # (B, L, D)
        if self.pad_id is None:
            mask = torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)
        else:
            mask = (x != self.pad_id).long()
        return hidden, mask


class OutputHead(nn.Module):
    """Reads the last ``read_tokens`` real tokens and projects each to ``outputs_per_token`` x C logits."""

    def __init__(self, spec: TaskSpec, hidden_size: int) -> None:
        super().__init__()
        self.read_tokens, self.logits_shape = spec.read_tokens, spec.logits_shape
        self.linear = nn.Linear(hidden_size, spec.outputs_per_token * spec.num_classes)

    def forward(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, _, D = last_hidden.shape
        length = attention_mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens are a prefix
        idx = length - self.read_tokens + torch.arange(self.read_tokens, device=length.device)  # (B, k)
        read = last_hidden.gather(1, idx.unsqueeze(-1).expand(B, self.read_tokens, D))  # (B, k, D)
        return self.linear(read).reshape(B, *self.logits_shape)


class FPT(nn.Module):
    """One task's model: its heads and norm parameters around a shared frozen body."""

    def __init__(self, task: Task, body: Body) -> None:
        super().__init__()
        self.spec = task.spec
        self.body = body.freeze()
        self.input_head = InputHead(task, body)
        weight, bias = body.default_norms()
        self.norm_weight = nn.Parameter(weight.clone())  # (N_norm, D)
        self.norm_bias = nn.Parameter(bias.clone())  # (N_norm, D)
        self.output_head = OutputHead(task.spec, body.hidden_size)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        hidden, mask = self.input_head(raw)  # (B, L, D), (B, L)
        B = hidden.shape[0]
        last = self.body(hidden, mask, self.norm_weight.expand(B, -1, -1), self.norm_bias.expand(B, -1, -1))
        return self.output_head(last, mask)

    def train(self, mode: bool = True) -> FPT:
        super().train(mode)
        self.body.eval()  # the body is frozen: no dropout, ever
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that train (what a checkpoint stores)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())
