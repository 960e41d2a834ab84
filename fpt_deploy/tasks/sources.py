"""Where a declared task's examples come from: an ``.npz`` of arrays or a folder of images.

    .npz      x, y (required); x_test, y_test (both or neither); labels (class names, optional)
    folder    one subfolder per class holding PNG/JPEG files (torchvision's ``ImageFolder`` layout);
              the class names are the folder names, in sorted order

Without a held-out split the examples are split per class with a fixed seed (``stratified_split``).
Reading collects problems instead of raising, so the caller reports every problem in one message.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(kw_only=True)
class Examples:
    """One split as read from disk: raw inputs and labels, before any checks."""

    x: np.ndarray
    y: np.ndarray
    label_names: tuple[str, ...] = ()  # from the source (folder names, an npz ``labels`` array)


def read_source(
    path: Path, problems: list[str], what: str = "data", classes: tuple[str, ...] = ()
) -> tuple[Examples | None, Examples | None]:
    """``(examples, held_out or None)`` from ``path``; ``(None, None)`` with ``problems`` filled on failure.

    ``classes``: a training folder's class names, which fix the label order of a held-out folder.
    """
    if not path.exists():
        problems.append(f"{what} {path} does not exist")
        return None, None
    if path.is_dir():
        return read_image_folder(path, problems, classes), None
    if path.suffix == ".npz":
        return read_npz(path, problems)
    problems.append(f"{what} {path} is neither an .npz file nor a folder of class subfolders")
    return None, None


def read_npz(path: Path, problems: list[str]) -> tuple[Examples | None, Examples | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:  # ValueError: object arrays, which need pickle
        problems.append(f"{path} cannot be read as an .npz of plain arrays ({e})")
        return None, None
    missing = [k for k in ("x", "y") if k not in arrays]
    if ("x_test" in arrays) != ("y_test" in arrays):
        missing.append("y_test" if "x_test" in arrays else "x_test")
    if missing:
        problems.append(
            f"{path} has no {', '.join(missing)} (it holds {', '.join(sorted(arrays)) or 'nothing'}); "
            "save x and y, and x_test with y_test or neither"
        )
        return None, None
    names = tuple(str(s) for s in arrays["labels"].tolist()) if "labels" in arrays else ()
    train = Examples(x=arrays["x"], y=arrays["y"], label_names=names)
    test = Examples(x=arrays["x_test"], y=arrays["y_test"], label_names=names) if "x_test" in arrays else None
    return train, test


def _image_array(path: Path) -> np.ndarray:
    """One image as uint8 [H, W] (greyscale) or [H, W, 3] (colour, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
        return np.asarray(img, dtype=np.uint8)


def read_image_folder(root: Path, problems: list[str], classes: tuple[str, ...] = ()) -> Examples | None:
    """Every PNG/JPEG under ``root/<class>/``; ``classes`` (a training folder's) fixes the label order."""
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        found, _ = find_classes(str(root))
    except FileNotFoundError:
        problems.append(f"{root} holds no class subfolders; put each class's images in {root}/<class name>/")
        return None
    names = tuple(classes) or tuple(found)
    extra = sorted(set(found) - set(names))
    if extra:
        problems.append(f"{root} has classes {', '.join(extra)} that the training folder does not have")
    index = {name: i for i, name in enumerate(names) if name in found}
    samples = make_dataset(str(root), index, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    if not samples:
        problems.append(f"{root} holds no PNG or JPEG images in its class subfolders")
        return None
    images, labels, bad = [], [], []
    for file, label in samples:
        try:
            images.append(_image_array(Path(file)))
            labels.append(label)
        except OSError as e:
            bad.append(f"{file} ({e})")
    if bad:
        problems.append(f"{len(bad)} image(s) under {root} cannot be read: {', '.join(bad[:3])}")
    shapes = Counter(img.shape for img in images)
    if len(shapes) > 1:
        (common, _), *others = shapes.most_common()
        odd = next(f for (f, _), img in zip(samples, images, strict=False) if img.shape != common)
        problems.append(
            f"images under {root} differ in shape: {_shape(common)} ({shapes[common]} files), "
            + ", ".join(f"{_shape(s)} ({n})" for s, n in others)
            + f", e.g. {odd}; resize them to one size"
        )
        return None
    if not images:
        return None
    return Examples(x=np.stack(images), y=np.asarray(labels, dtype=np.int64), label_names=names)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: per class, a seeded ``test_fraction`` of its examples is held out.

    Each class with two or more examples keeps at least one on each side. Multi-output labels (bits)
    are split at random instead, with the same seed.
    """
    rng = np.random.default_rng(seed)
    if y.ndim != 1:
        order = rng.permutation(len(y))
        n_test = max(1, int(round(test_fraction * len(y))))
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    test = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        test.append(members[:k])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
