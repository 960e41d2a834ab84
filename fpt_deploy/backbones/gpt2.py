"""GPT-2 body: pre-LN causal blocks with per-row norm parameters (the paper's model).

Norm rows: per block 2i = ln_1, 2i+1 = ln_2, and the last row = ln_f.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fpt_deploy.backbones.base import Body, TransformerBlock, dropout, layer_norm_per_row, multi_head_attention


class GPT2Body(Body):
    architecture = "gpt2"

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        d, layers = config["n_embd"], config["n_layer"]
        self.hidden_size, self.heads, self.eps = d, config["n_head"], config["layer_norm_epsilon"]
        self.num_norms = 2 * layers + 1
        self.norm_names = [f"h.{i}.{n}" for i in range(layers) for n in ("ln_1", "ln_2")] + ["ln_f"]
        self.max_positions = config["n_positions"]
        self.blocks = nn.ModuleList(TransformerBlock(d, config["n_inner"] or 4 * d) for _ in range(layers))
        self._register_pretrained(d)

    def forward(self, hidden, attention_mask, norm_weight, norm_bias):
        L = hidden.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=hidden.device).tril()  # (L, L)
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
        p, record = self._dropout(), self._attention_record  # (0.0, None) unless asked for
        x = hidden
        for i, blk in enumerate(self.blocks):
            h = layer_norm_per_row(x, norm_weight[:, 2 * i], norm_bias[:, 2 * i], self.eps)
            x = x + dropout(blk.attn_out(multi_head_attention(h, blk.qkv, self.heads, mask, p, record)), p)
            h = layer_norm_per_row(x, norm_weight[:, 2 * i + 1], norm_bias[:, 2 * i + 1], self.eps)
            x = x + dropout(blk.ff_out(F.gelu(blk.ff_in(h), approximate="tanh")), p)
        return layer_norm_per_row(x, norm_weight[:, -1], norm_bias[:, -1], self.eps)

    @classmethod
    def from_hf(cls, model) -> GPT2Body:
        """Copy the frozen weights of a ``transformers.GPT2Model`` (its Conv1D weights are transposed)."""
        cfg = model.config
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {cfg.activation_function!r}")
        body = cls(
            {
                "architecture": "gpt2",
                "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "n_inner": cfg.n_inner,
                "layer_norm_epsilon": cfg.layer_norm_epsilon,
                "n_positions": cfg.n_positions,
            }
        )
        norms_w, norms_b = [], []
        with torch.no_grad():
            for blk, h in zip(body.blocks, model.h, strict=True):
                for ours, conv in (
                    (blk.qkv, h.attn.c_attn),
                    (blk.attn_out, h.attn.c_proj),
                    (blk.ff_in, h.mlp.c_fc),
                    (blk.ff_out, h.mlp.c_proj),
                ):
                    ours.weight.copy_(conv.weight.T)
                    ours.bias.copy_(conv.bias)
                norms_w += [h.ln_1.weight, h.ln_2.weight]
                norms_b += [h.ln_1.bias, h.ln_2.bias]
            body.pretrained_norm_weight.copy_(torch.stack(norms_w + [model.ln_f.weight]))
            body.pretrained_norm_bias.copy_(torch.stack(norms_b + [model.ln_f.bias]))
            body.pretrained_positions.copy_(model.wpe.weight)
        return body.freeze()
