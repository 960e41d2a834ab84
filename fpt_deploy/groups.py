"""Trained-parameter groups (torch-free, so configs and the CLI can name them without importing torch).

The paper trains the input layer, the positional embeddings, the norm layers' scales and biases and the
output layer (its "FPT" set, section 2); its ablations train fewer (section 3.4, Table 6), and its full
fine-tuning baseline trains the body's attention and feed-forward weights too (``all``).
"""

from __future__ import annotations

from typing import Literal

TrainGroup = Literal["input", "positions", "norms", "output", "attention", "feedforward", "all"]
HEAD_GROUPS = ("input", "positions", "norms", "output")  # the task's own tensors, never the body's
FPT_GROUPS = HEAD_GROUPS  # the paper's frozen pretrained transformer
# the body's weights (an LSTM body: the recurrent weights are "attention", the input weights "feedforward")
BODY_GROUPS = ("attention", "feedforward")


def expand_groups(train: tuple[str, ...] | list[str]) -> frozenset[str]:
    """The named groups with ``all`` expanded."""
    return frozenset((*HEAD_GROUPS, *BODY_GROUPS) if "all" in train else train)


def trains_body(train: tuple[str, ...] | list[str]) -> bool:
    return bool(expand_groups(train) & set(BODY_GROUPS))
