"""A frozen random LSTM body: the paper's recurrent baseline (section 3.2, "Does the transformer matter?").

The reference code's LSTM (``LNLSTM`` of ``LayerNormLSTM`` cells, Ba et al. 2016) is 3 unidirectional
layers as wide as the transformer it stands in for (768), each cell::

    i2h = LN_i(W_i x_t)     h2h = LN_h(W_h h_{t-1})     (both over the 4 gates, 4D values)
    i, f, o = sigmoid(i2h + h2h)[:3D]     g = tanh(i2h + h2h)[3D:]
    c_t = LN_c(f * c_{t-1} + i * g)       h_t = dropout(o * tanh(c_t))

with the reference's layer norm: the unbiased variance, eps 1e-6 inside the square root, and a scale and
bias drawn uniform in +-1/sqrt(width) (near zero, not 1 and 0). Every linear weight and bias is uniform in
+-1/sqrt(D). Initial states are Xavier-drawn, std sqrt(2 / (in + hidden)). There are no positions: the
model adds none and never trains them (``uses_positions``).

Here each norm takes its scale and bias per batch row, exactly like the transformer bodies (``Body``), so
the backbone contract carries over: a 4D-wide gate norm is four rows of D, and a layer owns nine rows
(``norm_names``: ``lstm.<l>.ln_i2h.{i,f,o,g}``, ``lstm.<l>.ln_h2h.{i,f,o,g}``, ``lstm.<l>.ln_cell``).

Where this body departs from the reference, for serving:

- the reference draws fresh initial states on every call; this body draws them once (seeded buffers, in
  the fingerprint), so evaluation and serving are deterministic. While training with dropout (the body
  in training mode, ``ModelOptions.dropout``) it draws fresh ones every batch, like the reference;
- padding: real tokens are a prefix of each row and the cell runs left to right, so their states never
  see the padding; padded positions are zeroed on the way in.

The recurrence runs as a Python loop in eager mode and as ``torch.ops.higher_order.scan`` under
``torch.export`` (the ONNX exporter turns it into a Scan with a dynamic length).

Trained-parameter groups (``--train``): the recurrent weights (``h2h``, mixing across tokens) count as
``attention``, the input weights (``i2h``, per token) as ``feedforward``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from fpt_deploy.backbones.base import Body, dropout
from fpt_deploy.backbones.registry import BackboneEntry
from fpt_deploy.errors import ConfigError

DEFAULT_WIDTH = 768  # GPT-2 small's width, the reference's setting
LAYERS = 3
MAX_POSITIONS = 1024
EPS = 1e-6  # the reference's layer-norm epsilon
NORMS_PER_LAYER = 9  # ln_i2h (4 rows), ln_h2h (4 rows), ln_cell
GATES = ("i", "f", "o", "g")
NAME = re.compile(r"^random-lstm(?:-(\d+))?$")  # random-lstm, random-lstm-384, ...


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's layer norm over the last dim: (x - mean) / sqrt(unbiased var + eps) * weight + bias.

    With n values the unbiased variance is the biased one times n / (n - 1), so this is the fused
    ``F.layer_norm`` with eps (n - 1) / n * eps, scaled by sqrt((n - 1) / n)."""
    n = x.shape[-1]
    shrink = (n - 1) / n
    return F.layer_norm(x, (n,), eps=eps * shrink) * (weight * shrink**0.5) + bias


class LSTMLayer(nn.Module):
    """One ``LayerNormLSTM`` cell's frozen weights: input -> 4 gates and hidden -> 4 gates."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.i2h = nn.Linear(d, 4 * d)
        self.h2h = nn.Linear(d, 4 * d)
        bound = 1.0 / math.sqrt(d)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class LSTMBody(Body):
    architecture = "lstm"
    uses_positions = False  # the reference adds no positions to an LSTM's input

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        d, layers = config["hidden_size"], config["num_layers"]
        self.hidden_size, self.eps = d, config["layer_norm_eps"]
        self.num_norms = NORMS_PER_LAYER * layers
        self.norm_names = [
            f"lstm.{i}.{name}"
            for i in range(layers)
            for name in [f"ln_i2h.{g}" for g in GATES] + [f"ln_h2h.{g}" for g in GATES] + ["ln_cell"]
        ]
        self.max_positions = config["max_positions"]
        self.layers = nn.ModuleList(LSTMLayer(d) for _ in range(layers))
        self._register_pretrained(d)
        std = math.sqrt(2.0 / (d + d))  # Xavier, the reference's init_hidden
        self.register_buffer("initial_states", torch.randn(layers, 2, d) * std)  # (layers, h|c, D)
        with torch.no_grad():  # the reference's LayerNorm init: scale and bias uniform in +-1/sqrt(width)
            w, b = (
                self.pretrained_norm_weight.view(layers, NORMS_PER_LAYER, d),
                self.pretrained_norm_bias.view(layers, NORMS_PER_LAYER, d),
            )
            for t in (w, b):
                t[:, :8].uniform_(-1 / math.sqrt(4 * d), 1 / math.sqrt(4 * d))
                t[:, 8].uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))

    def _states(self, i: int, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s initial (h, c), (B, D) each: fresh Xavier draws while training, else the fixed ones."""
        if self.training:
            std = math.sqrt(1.0 / self.hidden_size)
            h, c = (torch.randn(batch, self.hidden_size, device=like.device, dtype=like.dtype) * std for _ in "hc")
            return h, c
        h, c = self.initial_states[i].to(like.dtype)
        return h.expand(batch, -1).clone(), c.expand(batch, -1).clone()

    def forward(self, hidden, attention_mask, norm_weight, norm_bias):
        B, _, D = hidden.shape
        x = hidden * attention_mask[..., None].to(hidden.dtype)  # (B, L, D): padding zeroed
        p = self._dropout()
        for i, layer in enumerate(self.layers):
            rows = slice(NORMS_PER_LAYER * i, NORMS_PER_LAYER * (i + 1))
            w, b = norm_weight[:, rows], norm_bias[:, rows]  # (B, 9, D)
            # copies, not views of one tensor: scan's step may not take aliased inputs
            w_i, w_h, w_c = w[:, 0:4].reshape(B, 4 * D), w[:, 4:8].reshape(B, 4 * D).clone(), w[:, 8].clone()
            b_i, b_h, b_c = b[:, 0:4].reshape(B, 4 * D), b[:, 4:8].reshape(B, 4 * D).clone(), b[:, 8].clone()
            i2h = reference_layer_norm(layer.i2h(x), w_i[:, None], b_i[:, None], self.eps)  # (B, L, 4D)
            W, bias = layer.h2h.weight, layer.h2h.bias

            def step(carry, i2h_t, W=W, bias=bias, w_h=w_h, b_h=b_h, w_c=w_c, b_c=b_c):
                h, c = carry  # (B, D) each
                pre = i2h_t + reference_layer_norm(F.linear(h, W, bias), w_h, b_h, self.eps)  # (B, 4D)
                gates, g = pre[:, : 3 * D].sigmoid(), pre[:, 3 * D :].tanh()
                c = reference_layer_norm(gates[:, D : 2 * D] * c + gates[:, :D] * g, w_c, b_c, self.eps)
                h = dropout(gates[:, 2 * D :] * c.tanh(), p)
                return (h, c.clone()), h.clone()

            x = _recur(step, self._states(i, B, x), i2h)  # (B, L, D)
        return x

    def group_of(self, name: str) -> str:
        return "attention" if ".h2h." in name else "feedforward"

    @torch.no_grad()
    def attention_maps(self, hidden, attention_mask, norm_weight, norm_bias) -> list[torch.Tensor]:
        raise ConfigError("an LSTM body has no attention to draw; train the task on a transformer backbone")


def _recur(step, init: tuple[torch.Tensor, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
    """``step`` over the tokens of ``xs`` (B, L, F) from the carry ``init``: (B, L, D) outputs."""
    if torch.compiler.is_exporting():
        from torch._higher_order_ops.scan import scan

        _, ys = scan(step, init, xs.transpose(0, 1))  # (L, B, D)
        return ys.transpose(0, 1)
    carry, ys = init, []
    for t in range(xs.shape[1]):
        carry, y = step(carry, xs[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1)


def random_lstm(width: int = DEFAULT_WIDTH, layers: int = LAYERS, seed: int = 0) -> LSTMBody:
    """A random LSTM body with a fixed seed, so the same width and seed always have the same fingerprint."""
    config = {
        "architecture": "lstm",
        "cell": "layer-norm-lstm",
        "hidden_size": width,
        "num_layers": layers,
        "layer_norm_eps": EPS,
        "max_positions": MAX_POSITIONS,
        "seed": seed,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        body = LSTMBody(config)
    return body.freeze()


def load_lstm_by_name(name: str, seed: int = 0) -> LSTMBody | None:
    """``random-lstm`` (768 wide) or ``random-lstm-<width>``; None for any other name."""
    m = NAME.match(name)
    if m is None:
        return None
    width = int(m.group(1) or DEFAULT_WIDTH)
    if not 1 <= width <= 8192:
        return None
    return random_lstm(width, seed=seed)


RANDOM_LSTM = BackboneEntry(
    name="random-lstm",
    description="3-layer layer-norm LSTM (the reference's LayerNormLSTM), random init, 768 wide "
    "(random-lstm-<width> for others)",
    source="config only",
    loader=load_lstm_by_name,
    matches=lambda name: (m := NAME.match(name)) is not None and 1 <= int(m.group(1) or DEFAULT_WIDTH) <= 8192,
)
