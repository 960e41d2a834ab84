"""BERT-architecture body (MiniLM): post-LN blocks with per-row norm parameters.

Norm rows: 0 = embedding LayerNorm, then per block 2i+1 = attention-output LN, 2i+2 = output LN.
Token-type embedding 0 is a constant added to every position; it is folded into the default
positions so the body's input is exactly ``input_projection + position``. RoBERTa has the same blocks; its
positions start after the padding index (``pad_token_id + 1``), so its table is taken from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fpt_deploy.backbones.base import Body, TransformerBlock, dropout, layer_norm_per_row, multi_head_attention


class BertBody(Body):
    architecture = "bert"

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        d, layers = config["hidden_size"], config["num_hidden_layers"]
        self.hidden_size, self.heads, self.eps = d, config["num_attention_heads"], config["layer_norm_eps"]
        self.num_norms = 1 + 2 * layers
        self.norm_names = ["embeddings.LayerNorm"] + [
            f"layer.{i}.{n}" for i in range(layers) for n in ("attention.output.LayerNorm", "output.LayerNorm")
        ]
        self.max_positions = config["max_position_embeddings"]
        self.blocks = nn.ModuleList(TransformerBlock(d, config["intermediate_size"]) for _ in range(layers))
        self._register_pretrained(d)

    def forward(self, hidden, attention_mask, norm_weight, norm_bias):
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys a query may attend to
        p, record = self._dropout(), self._attention_record  # (0.0, None) unless asked for
        x = layer_norm_per_row(hidden, norm_weight[:, 0], norm_bias[:, 0], self.eps)
        for i, blk in enumerate(self.blocks):
            a = dropout(blk.attn_out(multi_head_attention(x, blk.qkv, self.heads, mask, p, record)), p)
            x = layer_norm_per_row(x + a, norm_weight[:, 2 * i + 1], norm_bias[:, 2 * i + 1], self.eps)
            f = dropout(blk.ff_out(F.gelu(blk.ff_in(x))), p)
            x = layer_norm_per_row(x + f, norm_weight[:, 2 * i + 2], norm_bias[:, 2 * i + 2], self.eps)
        return x

    @classmethod
    def from_hf(cls, model) -> BertBody:
        """Copy the frozen weights of a ``transformers.BertModel`` (or ``RobertaModel``)."""
        cfg = model.config
        offset = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0  # RoBERTa's first position id
        body = cls(
            {
                "architecture": "bert",
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size,
                "layer_norm_eps": cfg.layer_norm_eps,
                "max_position_embeddings": cfg.max_position_embeddings - offset,
                "hidden_act": cfg.hidden_act,
                **({"model_type": cfg.model_type} if offset else {}),
            }
        )
        if cfg.hidden_act != "gelu":
            raise ValueError(f"unsupported BERT activation {cfg.hidden_act!r}; only exact gelu is implemented")
        emb = model.embeddings
        norms_w, norms_b = [emb.LayerNorm.weight], [emb.LayerNorm.bias]
        with torch.no_grad():
            for blk, layer in zip(body.blocks, model.encoder.layer, strict=True):
                att = layer.attention
                blk.qkv.weight.copy_(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight]))
                blk.qkv.bias.copy_(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]))
                blk.attn_out.load_state_dict(att.output.dense.state_dict())
                blk.ff_in.load_state_dict(layer.intermediate.dense.state_dict())
                blk.ff_out.load_state_dict(layer.output.dense.state_dict())
                norms_w += [att.output.LayerNorm.weight, layer.output.LayerNorm.weight]
                norms_b += [att.output.LayerNorm.bias, layer.output.LayerNorm.bias]
            body.pretrained_norm_weight.copy_(torch.stack(norms_w))
            body.pretrained_norm_bias.copy_(torch.stack(norms_b))
            token_type = emb.token_type_embeddings.weight[0]
            body.pretrained_positions.copy_(emb.position_embeddings.weight[offset:] + token_type)
        return body.freeze()
