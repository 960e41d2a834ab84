"""A frozen random LSTM body: the paper's recurrent baseline (section 3.2, "Does the transformer matter?").

The reference code's LSTM is a 3-layer unidirectional LSTM with a layer norm after each layer, as wide as
the transformer it stands in for. Here each layer norm takes its scale and bias per batch row, exactly like
the transformer bodies (``Body``), so the backbone contract carries over: N_norm = layers, and a batch of
mixed tasks runs in one call.

Real tokens are a prefix of each row and the LSTM runs left to right, so the states at the real tokens
never see the padding; padded positions are zeroed on the way in (which also keeps ``attention_mask`` an
input of the exported graph). The body has no positions of its own: tasks start theirs at zero.

Trained-parameter groups (``--train``): the recurrent weights (``weight_hh``, mixing across tokens) count as
``attention``, the input weights and biases (per token) as ``feedforward``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fpt_deploy.backbones.base import Body, layer_norm_per_row
from fpt_deploy.backbones.registry import BackboneEntry
from fpt_deploy.errors import ConfigError

DEFAULT_WIDTH = 768  # GPT-2 small's width, the reference's setting
LAYERS = 3
MAX_POSITIONS = 1024
NAME = re.compile(r"^random-lstm(?:-(\d+))?$")  # random-lstm, random-lstm-384, ...


class LSTMBody(Body):
    architecture = "lstm"

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        d, layers = config["hidden_size"], config["num_layers"]
        self.hidden_size, self.eps = d, config["layer_norm_eps"]
        self.num_norms = layers
        self.norm_names = [f"lstm.{i}.LayerNorm" for i in range(layers)]
        self.max_positions = config["max_positions"]
        self.lstms = nn.ModuleList(nn.LSTM(d, d, batch_first=True) for _ in range(layers))
        self._register_pretrained(d)

    def forward(self, hidden, attention_mask, norm_weight, norm_bias):
        x = hidden * attention_mask[..., None].to(hidden.dtype)  # (B, L, D): padding zeroed
        # The body stays in eval mode while the heads train; cuDNN's LSTM has no backward in eval mode,
        # so gradients to the input head go through the native kernel on a GPU.
        native = x.is_cuda and torch.is_grad_enabled() and not self.training
        with torch.backends.cudnn.flags(enabled=not native):
            for i, lstm in enumerate(self.lstms):
                x, _ = lstm(x)  # (B, L, D)
                x = layer_norm_per_row(x, norm_weight[:, i], norm_bias[:, i], self.eps)
        return x

    def group_of(self, name: str) -> str:
        return "attention" if ".weight_hh" in name else "feedforward"

    @torch.no_grad()
    def attention_maps(self, hidden, attention_mask, norm_weight, norm_bias) -> list[torch.Tensor]:
        raise ConfigError("an LSTM body has no attention to draw; train the task on a transformer backbone")


def random_lstm(width: int = DEFAULT_WIDTH, layers: int = LAYERS, seed: int = 0) -> LSTMBody:
    """A random LSTM body with a fixed seed, so the same width always has the same fingerprint."""
    config = {
        "architecture": "lstm",
        "hidden_size": width,
        "num_layers": layers,
        "layer_norm_eps": 1e-5,
        "max_positions": MAX_POSITIONS,
        "seed": seed,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        body = LSTMBody(config)
    return body.freeze()


def load_lstm_by_name(name: str) -> LSTMBody | None:
    """``random-lstm`` (768 wide) or ``random-lstm-<width>``; None for any other name."""
    m = NAME.match(name)
    if m is None:
        return None
    width = int(m.group(1) or DEFAULT_WIDTH)
    if not 1 <= width <= 8192:
        return None
    return random_lstm(width)


RANDOM_LSTM = BackboneEntry(
    name="random-lstm",
    description="3-layer LSTM with layer norms, random init, 768 wide (random-lstm-<width> for others)",
    source="config only",
    loader=load_lstm_by_name,
    matches=lambda name: (m := NAME.match(name)) is not None and 1 <= int(m.group(1) or DEFAULT_WIDTH) <= 8192,
)
