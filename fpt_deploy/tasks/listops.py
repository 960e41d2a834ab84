"""ListOps (Nangia & Bowman 2018; Long Range Arena): evaluate nested MAX/MIN/MED/SUM_MOD lists.

A real generator of the grammar: random trees, rejection-sampled to a length range, evaluated
exactly. Tokens: 0 = padding, digits 0-9 -> 1..10, [MIN [MAX [MED [SM -> 11..14, ] -> 15.
"""

from __future__ import annotations

import random

import numpy as np

from fpt_deploy.tasks.base import TaskData, TaskOption, TokenTask

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def evaluate(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, leaf_prob: float):
    """A random expression: (tokens, value). Leaves become likelier nowhere but at ``max_depth``."""
    if depth >= max_depth or (depth > 0 and rng.random() < leaf_prob):
        v = rng.randrange(10)
        return [str(v)], v
    op = rng.choice(OPERATORS)
    tokens, values = [op], []
    for _ in range(rng.randint(2, max_args)):
        t, v = generate_tree(rng, depth + 1, max_depth, max_args, leaf_prob)
        tokens += t
        values.append(v)
    return tokens + ["]"], evaluate(op, values)


class ListOps(TokenTask):
    name = "listops"
    description = "ListOps: nested MAX/MIN/MED/SUM_MOD expressions as token ids, 10 classes (generated)"
    vocab_size = len(VOCAB)
    num_classes = 10
    declared_options = {
        "max_len": TaskOption(type=int, default=512, help="tokens a sequence (longer expressions are redrawn)"),
        "min_len": TaskOption(type=int, default=32, help="fewest tokens an expression has"),
        "max_depth": TaskOption(type=int, default=10, help="deepest nesting"),
        "max_args": TaskOption(type=int, default=5, help="most arguments of an operator"),
        "leaf_prob": TaskOption(type=float, default=0.6, help="chance an argument is a digit, not a list"),
        "train_size": TaskOption(type=int, default=20000, help="generated training examples"),
        "test_size": TaskOption(type=int, default=2000, help="generated held-out examples"),
    }

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        o = self.options
        rng = random.Random(seed * 2 + (split == "test"))
        size, L = o[f"{split}_size"], o["max_len"]
        x = np.zeros((size, L), dtype=np.int64)
        y = np.zeros(size, dtype=np.int64)
        i = 0
        while i < size:
            tokens, value = generate_tree(rng, 0, o["max_depth"], o["max_args"], o["leaf_prob"])
            if o["min_len"] <= len(tokens) <= L:
                x[i, : len(tokens)] = [TOKEN_ID[t] for t in tokens]
                y[i] = value
                i += 1
        return TaskData(inputs=x, labels=y, source="generated")
