"""Generated bit tasks from the paper: Bit XOR and Bit Memory (section 3.1)."""

from __future__ import annotations

import numpy as np

from fpt_deploy.errors import ConfigError
from fpt_deploy.tasks.base import Task, TaskData, TaskSpec
from fpt_deploy.tasks.preprocess import BitPatches
from fpt_deploy.tasks.registry import register_task


def _split_seed(split: str, seed: int) -> int:
    return seed * 2 + (split == "test")  # train and test never share a generator stream


@register_task
class BitXor(Task):
    name = "bit-xor"
    description = "element-wise XOR of two n-bit strings, 1 bit a token (generated)"
    default_options = {"n": 5, "train_size": 10000, "test_size": 1000}

    def build_spec(self) -> TaskSpec:
        n = self.options["n"]
        return TaskSpec(self.name, (2 * n,), "uint8", 2 * n, 1, 0, 2, n, 1, ("0", "1"), dict(self.options))

    def build_preprocess(self):
        return BitPatches(1)

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        n, size = self.options["n"], self.options[f"{split}_size"]
        rng = np.random.default_rng(_split_seed(split, seed))
        x = rng.integers(0, 2, size=(size, 2 * n), dtype=np.uint8)
        y = (x[:, :n] ^ x[:, n:]).astype(np.int64)  # (N, n)
        return TaskData(x, y, "generated")


@register_task
class BitMemory(Task):
    name = "bit-memory"
    description = "recall one of 5 n-bit strings from a half-masked copy; patch bits a token (generated)"
    default_options = {"n": 1000, "patch": 50, "strings": 5, "mask_prob": 0.5, "train_size": 20000, "test_size": 1000}

    def build_spec(self) -> TaskSpec:
        n, p, s = self.options["n"], self.options["patch"], self.options["strings"]
        if n % p:
            raise ConfigError(f"bit-memory: n={n} must be a multiple of patch={p}")
        return TaskSpec(
            self.name, ((s + 1) * n,), "uint8", (s + 1) * n // p, p, 0, 2, n // p, p, ("0", "1"), dict(self.options)
        )

    def build_preprocess(self):
        return BitPatches(self.options["patch"])

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        n, s, size = self.options["n"], self.options["strings"], self.options[f"{split}_size"]
        rng = np.random.default_rng(_split_seed(split, seed))
        strings = rng.integers(0, 2, size=(size, s, n), dtype=np.uint8)
        target = strings[np.arange(size), rng.integers(0, s, size=size)]  # (N, n)
        query = np.where(rng.random((size, n)) < self.options["mask_prob"], np.uint8(2), target)
        x = np.concatenate([strings.reshape(size, s * n), query], axis=1)
        return TaskData(x, target.astype(np.int64), "generated")
