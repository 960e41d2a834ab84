"""Vision transformer body (ViT, DeiT): pre-LN bidirectional blocks with per-row norm parameters.

The paper's "why language?" row: a frozen body pretrained on images (ImageNet ViT-B/16) in place of GPT-2.
The blocks are GPT-2's layout without the causal mask, with exact GELU: norm rows per block
2i = ``layernorm_before``, 2i+1 = ``layernorm_after``, and the last row = the final ``layernorm``.

The image embedding (patches, class token) stays out: a task's input layer takes its place, as for GPT-2.
Positions follow the reference code, which gives a ViT body a fresh position table of 1,024 zeros that
the task trains (``vit_pos_embed``), not ViT's 197 image positions. Padding is masked like the other
bodies' (ViT itself has no attention mask; with no padding the two agree exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fpt_deploy.backbones.base import Body, TransformerBlock, dropout, layer_norm_per_row, multi_head_attention

MAX_POSITIONS = 1024  # the reference's vit_pos_embed


class ViTBody(Body):
    architecture = "vit"

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        d, layers = config["hidden_size"], config["num_hidden_layers"]
        self.hidden_size, self.heads, self.eps = d, config["num_attention_heads"], config["layer_norm_eps"]
        self.num_norms = 2 * layers + 1
        self.norm_names = [f"layer.{i}.{n}" for i in range(layers) for n in ("layernorm_before", "layernorm_after")] + [
            "layernorm"
        ]
        self.max_positions = config["max_positions"]
        self.blocks = nn.ModuleList(TransformerBlock(d, config["intermediate_size"]) for _ in range(layers))
        self._register_pretrained(d)

    def forward(self, hidden, attention_mask, norm_weight, norm_bias):
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys a query may attend to
        p, record = self._dropout(), self._attention_record
        x = hidden
        for i, blk in enumerate(self.blocks):
            h = layer_norm_per_row(x, norm_weight[:, 2 * i], norm_bias[:, 2 * i], self.eps)
            x = x + dropout(blk.attn_out(multi_head_attention(h, blk.qkv, self.heads, mask, p, record)), p)
            h = layer_norm_per_row(x, norm_weight[:, 2 * i + 1], norm_bias[:, 2 * i + 1], self.eps)
            x = x + dropout(blk.ff_out(F.gelu(blk.ff_in(h))), p)
        return layer_norm_per_row(x, norm_weight[:, -1], norm_bias[:, -1], self.eps)

    @classmethod
    def from_hf(cls, model) -> ViTBody:
        """Copy the frozen weights of a ``transformers.ViTModel`` (or ``DeiTModel``, the same blocks)."""
        cfg = model.config
        if cfg.hidden_act != "gelu":
            raise ValueError(f"unsupported ViT activation {cfg.hidden_act!r}; only exact gelu is implemented")
        body = cls(
            {
                "architecture": "vit",
                "model_type": cfg.model_type,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size,
                "layer_norm_eps": cfg.layer_norm_eps,
                "max_positions": MAX_POSITIONS,
            }
        )
        norms_w, norms_b = [], []
        with torch.no_grad():
            for blk, layer in zip(body.blocks, _layers(model), strict=True):
                q, k, v, out, ff_in, ff_out = _linears(layer)
                for name in ("weight", "bias"):
                    parts = [getattr(t, name) for t in (q, k, v)]
                    parts = [torch.zeros(cfg.hidden_size) if t is None else t for t in parts]  # qkv_bias=False
                    getattr(blk.qkv, name).copy_(torch.cat(parts))
                blk.attn_out.load_state_dict(out.state_dict())
                blk.ff_in.load_state_dict(ff_in.state_dict())
                blk.ff_out.load_state_dict(ff_out.state_dict())
                norms_w += [layer.layernorm_before.weight, layer.layernorm_after.weight]
                norms_b += [layer.layernorm_before.bias, layer.layernorm_after.bias]
            body.pretrained_norm_weight.copy_(torch.stack(norms_w + [model.layernorm.weight]))
            body.pretrained_norm_bias.copy_(torch.stack(norms_b + [model.layernorm.bias]))
        return body.freeze()


def _layers(model):
    """The blocks: ``model.layers`` (transformers 5) or ``model.encoder.layer`` (4.x)."""
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def _linears(layer):
    """query, key, value, attention output, feed-forward in and out of one block, in either layout."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers 5
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, layer.mlp.fc1, layer.mlp.fc2
    a = att.attention
    return a.query, a.key, a.value, att.output.dense, layer.intermediate.dense, layer.output.dense
