"""The Frozen Pretrained Transformer (Lu et al. 2021): per-task heads around one frozen body.

    raw input -> InputHead (preprocess, Linear|Embedding, + positions) -> Body (frozen; norms per task)
              -> OutputHead (last token(s) -> Linear) -> logits

What trains is named by parameter groups (``ModelOptions.train``). The default is the paper's FPT set
(section 2, Table 15): the input layer, the positional embeddings, every norm layer's scale and bias,
and the output layer. The paper's ablations (section 3.4) train fewer of them; its "full" baseline
(``all``) trains the body's attention and feed-forward weights too, and then the body is this task's
own copy with its own fingerprint (docs/architecture.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fpt_deploy.backbones.base import Body
from fpt_deploy.model_options import ModelOptions
from fpt_deploy.tasks.base import Task, TaskSpec

__all__ = ["FPT", "InputHead", "ModelOptions", "OutputHead"]


def _hidden_stack(d: int, layers: int, dropout: float, activation_first: bool) -> nn.Sequential:
    """``layers`` x (Linear D -> D, ReLU, Dropout), ordered for an input head (activation first) or output."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        block = [nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d)]
        mods += block if activation_first else [block[2], block[0], block[1]]
    return nn.Sequential(*mods)


def _task_positions(body: Body, length: int) -> torch.Tensor:
    """Positions for ``length`` tokens from the body's pretrained ones, tiled when a task needs more."""
    pretrained = body.default_positions()  # (P, D)
    reps = -(-length // pretrained.shape[0])
    return pretrained.repeat(reps, 1)[:length].clone()  # (length, D)


class InputHead(nn.Module):
    """Raw task input -> (hidden (B, L, D), attention_mask (B, L) int64)."""

    def __init__(self, task: Task, body: Body, options: ModelOptions | None = None) -> None:
        super().__init__()
        options = options or ModelOptions()
        spec, d = task.spec, body.hidden_size
        self.preprocess = task.build_preprocess()
        if spec.vocab_size:
            self.embed = nn.Embedding(spec.vocab_size, d)
        else:
            self.embed = nn.Linear(spec.token_dim, d)
            nn.init.orthogonal_(self.embed.weight, gain=options.input_gain)  # paper's input-layer init
            nn.init.zeros_(self.embed.bias)
        self.hidden = _hidden_stack(d, options.input_hidden_layers, options.dropout, activation_first=True)
        self.position = nn.Parameter(_task_positions(body, spec.seq_len))  # (L, D)
        self.dropout = nn.Dropout(options.dropout)  # GPT-2's embedding dropout (the reference's setting)
        self.pad_id = 0 if spec.vocab_size else None

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(raw)  # (B, L, F) float or (B, L) ids
        hidden = self.dropout(self.hidden(self.embed(x)) + self.position[: x.shape[1]])  # (B, L, D)
        if self.pad_id is None:
            mask = torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)
        else:
            mask = (x != self.pad_id).long()
        return hidden, mask


class OutputHead(nn.Module):
    """Reads the last ``read_tokens`` real tokens and projects each to ``outputs_per_token`` x C logits."""

    def __init__(self, spec: TaskSpec, hidden_size: int, options: ModelOptions | None = None) -> None:
        super().__init__()
        options = options or ModelOptions()
        self.read_tokens, self.logits_shape = spec.read_tokens, spec.logits_shape
        self.hidden = _hidden_stack(hidden_size, options.output_hidden_layers, options.dropout, activation_first=False)
        self.linear = nn.Linear(hidden_size, spec.outputs_per_token * spec.num_classes)

    def forward(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, _, D = last_hidden.shape
        length = attention_mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens are a prefix
        idx = length - self.read_tokens + torch.arange(self.read_tokens, device=length.device)  # (B, k)
        read = last_hidden.gather(1, idx.unsqueeze(-1).expand(B, self.read_tokens, D))  # (B, k, D)
        return self.linear(self.hidden(read)).reshape(B, *self.logits_shape)


class FPT(nn.Module):
    """One task's model: its heads and norm parameters around a shared frozen body.

    When ``options.train`` names a body group the body is copied first (the shared one, cached per
    process, stays untouched) and the named weights of the copy train.
    """

    def __init__(self, task: Task, body: Body, options: ModelOptions | None = None) -> None:
        super().__init__()
        self.spec = task.spec
        self.options = options = options or ModelOptions()
        self.base_fingerprint = body.fingerprint() if options.trains_body else None
        if options.trains_body:
            body = copy.deepcopy(body)
            body.__dict__.pop("_fingerprint", None)
        self.body = body.freeze()
        self.body.dropout = options.dropout
        self.input_head = InputHead(task, body, options)
        weight, bias = body.default_norms()
        self.norm_weight = nn.Parameter(weight.clone())  # (N_norm, D)
        self.norm_bias = nn.Parameter(bias.clone())  # (N_norm, D)
        self.output_head = OutputHead(task.spec, body.hidden_size, options)
        self._set_trained(options.groups)

    def _set_trained(self, groups: frozenset[str]) -> None:
        """requires_grad on exactly the parameters of ``groups``."""
        if not getattr(self.body, "uses_positions", True):  # an LSTM body: no positions, as the reference
            groups = groups - {"positions"}
        for name, p in self.named_parameters():
            p.requires_grad_(self.group_of(name) in groups)

    def group_of(self, name: str) -> str:
        """The trained-parameter group a parameter name belongs to."""
        if name.startswith("body."):
            return self.body.group_of(name.removeprefix("body."))
        if name == "input_head.position":
            return "positions"
        if name.startswith("input_head."):
            return "input"
        if name.startswith("output_head."):
            return "output"
        assert name in ("norm_weight", "norm_bias"), name
        return "norms"

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        hidden, mask = self.input_head(raw)  # (B, L, D), (B, L)
        B = hidden.shape[0]
        last = self.body(hidden, mask, self.norm_weight.expand(B, -1, -1), self.norm_bias.expand(B, -1, -1))
        return self.output_head(last, mask)

    def train(self, mode: bool = True) -> FPT:
        super().train(mode)
        if not self.options.dropout:
            self.body.eval()  # without dropout the body is deterministic in training too
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: every task tensor (heads and norms, trained or not, so an untrained
        input layer keeps its seeded init), plus the body's weights when a body group trains."""
        body = self.options.trains_body
        return {n: p.detach() for n, p in self.named_parameters() if body or not n.startswith("body.")}

    def export_blockers(self) -> list[str]:
        """Why this model cannot be exported to the shared-head repository format (empty: it can)."""
        problems = []
        if len(self.input_head.hidden) or len(self.output_head.hidden):
            problems.append("hidden layers in the input/output heads do not fit the shared head tables")
        problems += self.body.export_blockers()
        return problems

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())
