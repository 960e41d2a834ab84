"""Generated bit tasks from the paper: Bit XOR and Bit Memory (section 3.1)."""

from __future__ import annotations

import numpy as np

from fpt_deploy.errors import ConfigError
from fpt_deploy.tasks.base import Task, TaskData, TaskOption, TaskSpec
from fpt_deploy.tasks.preprocess import BitPatches


def _split_seed(split: str, seed: int) -> int:
    return seed * 2 + (split == "test")  # train and test never share a generator stream


class _BitTask(Task):
    """Rows of n-bit strings, ``patch`` bits a token; the last n // patch tokens read out one bit each."""

    def _bit_spec(self, *, strings: int) -> TaskSpec:
        n, p = self.options["n"], self.options["patch"]
        return TaskSpec(
            name=self.name,
            input_shape=(strings * n,),
            input_dtype="uint8",
            seq_len=strings * n // p,
            token_dim=p,
            num_classes=2,
            read_tokens=n // p,
            outputs_per_token=p,
            labels=("0", "1"),
            options=self.options,
        )

    def build_preprocess(self):
        return BitPatches(self.options["patch"])


class BitXor(_BitTask):
    name = "bit-xor"
    description = "element-wise XOR of n-bit strings (two by default), patch bits a token (generated)"
    declared_options = {
        "n": TaskOption(type=int, default=5, help="bits per string"),
        "strings": TaskOption(type=int, default=2, help="strings XORed together"),
        "patch": TaskOption(type=int, default=1, help="bits per token (divides n)"),
        "train_size": TaskOption(type=int, default=10000, help="generated training examples"),
        "test_size": TaskOption(type=int, default=1000, help="generated held-out examples"),
    }

    def build_spec(self) -> TaskSpec:
        n, p, s = self.options["n"], self.options["patch"], self.options["strings"]
        if n % p or s < 2:
            raise ConfigError(f"bit-xor: n={n} must be a multiple of patch={p}, and strings={s} at least 2")
        return self._bit_spec(strings=s)

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        n, s, size = self.options["n"], self.options["strings"], self.options[f"{split}_size"]
        rng = np.random.default_rng(_split_seed(split, seed))
        x = rng.integers(0, 2, size=(size, s * n), dtype=np.uint8)
        y = np.bitwise_xor.reduce(x.reshape(size, s, n), axis=1).astype(np.int64)  # (N, n)
        return TaskData(inputs=x, labels=y, source="generated")


class BitMemory(_BitTask):
    name = "bit-memory"
    description = "recall one of 5 n-bit strings from a half-masked copy; patch bits a token (generated)"
    declared_options = {
        "n": TaskOption(type=int, default=1000, help="bits per string"),
        "patch": TaskOption(type=int, default=50, help="bits per token (divides n)"),
        "strings": TaskOption(type=int, default=5, help="strings to recall from"),
        "mask_prob": TaskOption(type=float, default=0.5, help="fraction of the query's bits masked"),
        "train_size": TaskOption(type=int, default=20000, help="generated training examples"),
        "test_size": TaskOption(type=int, default=1000, help="generated held-out examples"),
        "fresh": TaskOption(
            type=bool, default=False, help="draw new strings for every training batch (the reference's)"
        ),
    }

    def build_spec(self) -> TaskSpec:
        n, p, s = self.options["n"], self.options["patch"], self.options["strings"]
        if n % p:
            raise ConfigError(f"bit-memory: n={n} must be a multiple of patch={p}")
        return self._bit_spec(strings=s + 1)  # the strings, then the masked query

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        return self._draw(self.options[f"{split}_size"], np.random.default_rng(_split_seed(split, seed)))

    def fresh_batch(self, size: int, seed: int, step: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """With ``-o fresh=true``: ``size`` new training examples for ``step`` (the same on a resume), else None.

        The validation and test splits stay the fixed sets ``load_data`` draws, from other streams."""
        if not self.options["fresh"]:
            return None
        data = self._draw(size, np.random.default_rng([seed, 1_000_003, step, rank]))
        return data.inputs, data.labels

    def _draw(self, size: int, rng: np.random.Generator) -> TaskData:
        n, s = self.options["n"], self.options["strings"]
        strings = rng.integers(0, 2, size=(size, s, n), dtype=np.uint8)
        target = strings[np.arange(size), rng.integers(0, s, size=size)]  # (N, n)
        query = np.where(rng.random((size, n)) < self.options["mask_prob"], np.uint8(2), target)
        x = np.concatenate([strings.reshape(size, s * n), query], axis=1)
        return TaskData(inputs=x, labels=target.astype(np.int64), source="generated")
