"""Input kinds of declared tasks: how raw arrays become tokens, checked before any training.

Each kind says which options it takes, what a valid raw example looks like, which statistics it
learns from the training split, and the preprocessing module that the input ONNX carries (so a
client sends the raw example). Adding a kind is one ``InputKind`` subclass (here or in a module of its
own) and one entry point in the group ``fpt_deploy.kinds`` (pyproject.toml); ``register_kind`` registers
one in code (``fpt_deploy.plugins.Registry``).

    image     uint8 [H, W] or [H, W, C] -> P x P patches, scaled to 0..1, normalised per channel
    sequence  float32 [T, F] (or [T]) -> ``patch`` steps a token, standardised
    tokens    int64 ids [T], padded with ``pad_id`` at the end -> embedded, read at the last real token
    bits      uint8 {0, 1, 2 = masked} [strings * length] -> ``patch`` bits a token; predicts ``length`` bits
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from fpt_deploy.plugins import Registry
from fpt_deploy.tasks.base import TaskOption
from fpt_deploy.tasks.preprocess import BitPatches, ImagePatches, PaddedTokenIds, SequencePatches

ENTRY_POINT_GROUP = "fpt_deploy.kinds"


def _adopt(name: str, cls: object, origin: str) -> type[InputKind] | None:
    return cls if isinstance(cls, type) and issubclass(cls, InputKind) and cls.name == name else None


KINDS: Registry[type[InputKind]] = Registry(
    ENTRY_POINT_GROUP, what="input kind", expects="an InputKind subclass named {name!r}", adopt=_adopt
)


def register_kind(cls: type[InputKind]) -> type[InputKind]:
    """Class decorator: register an ``InputKind`` subclass under its ``name``."""
    KINDS.register(cls.name, cls, origin=f"registered in code ({cls.__module__})")
    return cls


def get_kind(name: str) -> InputKind:
    return KINDS.get(name).value()


def kind_names() -> list[str]:
    return KINDS.names()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _chunked_moments(x: np.ndarray, axis: tuple[int, ...], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over ``axis`` (which includes 0, the example axis) in float64, without a float copy of x."""
    n, total, total_sq = 0, 0.0, 0.0
    per_example = int(np.prod([x.shape[a] for a in axis if a != 0]))
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].astype(np.float64)
        total = total + part.sum(axis=axis)
        total_sq = total_sq + (part * part).sum(axis=axis)
        n += part.shape[0] * per_example
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return mean, np.where(std > 1e-8, std, 1.0)  # a constant feature is left centred, not divided by 0


def _stat_option(scale: str) -> TaskOption:
    return TaskOption(
        type=str,
        default="",
        help=f"normalisation statistic {scale}: one value or one per channel, comma-separated; "
        "empty = computed from the training split",
    )


def _stat_values(text: str) -> list[float]:
    """The numbers of an explicit ``mean``/``std`` option (empty: none given); ValueError if not numbers."""
    return [float(v) for v in text.split(",")] if text.strip() else []


def _check_stats(o: dict) -> list[str]:
    """Problems with explicit ``mean``/``std``: given together, numbers, finite, std > 0."""
    problems = []
    if bool(o["mean"].strip()) != bool(o["std"].strip()):
        problems.append("give mean and std together, or neither to compute them from the training split")
    for key in ("mean", "std"):
        try:
            values = _stat_values(o[key])
        except ValueError:
            problems.append(f"{key} {o[key]!r} must be numbers: one value, or one per channel, comma-separated")
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f"{key} {o[key]!r} must be finite numbers")
        elif key == "std" and any(v <= 0 for v in values):
            problems.append(f"std {o[key]!r} must be greater than 0")
    return problems


def _check_stat_lengths(o: dict, channels: int, unit: str) -> list[str]:
    """Explicit statistics must hold one value or one per ``unit`` (channel or feature)."""
    problems = []
    for key in ("mean", "std"):
        try:
            n = len(_stat_values(o[key]))
        except ValueError:
            continue  # reported by _check_stats
        if n not in (0, 1, channels):
            need = "1" if channels == 1 else f"1 or {channels}"
            problems.append(f"{key} has {n} values but the data have {channels} {unit}(s); give {need}")
    return problems


def _explicit_stats(o: dict, channels: int) -> tuple[list[float], list[float]] | None:
    """The given ``mean``/``std``, one per channel (a single value repeated); None when not given."""
    mean, std = _stat_values(o["mean"]), _stat_values(o["std"])
    if not mean:
        return None
    return [mean[i % len(mean)] for i in range(channels)], [std[i % len(std)] for i in range(channels)]


class InputKind(ABC):
    """One way of turning raw examples into tokens."""

    name: ClassVar[str]
    description: ClassVar[str]
    input_dtype: ClassVar[str]
    options: ClassVar[dict[str, TaskOption]]
    multi_output: ClassVar[bool] = False  # labels (N, outputs) instead of (N,)

    def cast(self, x: np.ndarray) -> np.ndarray:
        """Raw examples in this kind's input dtype (after ``check_inputs`` found them valid)."""
        return x.astype(self.input_dtype, copy=False)

    @abstractmethod
    def check_inputs(self, o: dict, x: np.ndarray, where: str) -> list[str]:
        """Problems with the raw examples ``x`` (N, ...) of one split; ``where`` names it in messages."""

    @abstractmethod
    def fit(self, o: dict, x_train: np.ndarray) -> dict:
        """What this kind learns from the (valid) training split: shapes and statistics, JSON values."""

    @abstractmethod
    def spec_fields(self, o: dict, fitted: dict) -> dict:
        """``TaskSpec`` fields besides name, classes and labels: shapes, token layout and read-out."""

    @abstractmethod
    def build_preprocess(self, o: dict, fitted: dict):
        """The parameter-free torch module: raw batch -> tokens."""

    def check_options(self, o: dict) -> list[str]:
        """Problems with the (typed) options alone, found before any data is read."""
        return []

    def resolve_options(self, o: dict, x_train: np.ndarray, y_train: np.ndarray) -> dict:
        """Options left to the data (0 = "from the data") filled in from the training split."""
        return o

    def check_labels(self, o: dict, y: np.ndarray, n: int, where: str) -> list[str]:
        """Problems with labels of shape and dtype (range and coverage are checked by the caller)."""
        if y.ndim != 1 or len(y) != n:
            return [f"{where} labels have shape {list(y.shape)}; need one label per example, [{n}]"]
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            return [
                f"{where} labels are {y.dtype}; need integers 0..K-1 (map class names to integers and "
                "give the names as labels)"
            ]
        return []


class ImageKind(InputKind):
    name = "image"
    description = "uint8 images [H, W] or [H, W, C] cut into P x P patches, normalised per channel"
    input_dtype = "uint8"
    options = {
        "patch": TaskOption(type=int, default=4, help="patch side in pixels; divides H and W"),
        "mean": _stat_option("on the 0..1 scale (e.g. 0.485,0.456,0.406 for ImageNet)"),
        "std": _stat_option("on the 0..1 scale (e.g. 0.229,0.224,0.225 for ImageNet)"),
    }

    def check_options(self, o):
        return _check_stats(o)

    def check_inputs(self, o, x, where):
        problems = []
        if x.dtype != np.uint8:
            problems.append(f"{where} images are {x.dtype}; image data must be uint8 (0..255)")
        if x.ndim not in (3, 4):
            problems.append(f"{where} images have shape {list(x.shape)}; need [N, H, W] or [N, H, W, C]")
            return problems
        problems += _check_stat_lengths(o, x.shape[3] if x.ndim == 4 else 1, "channel")
        h, w, p = x.shape[1], x.shape[2], o["patch"]
        if p < 1 or h % p or w % p:
            fits = [d for d in _divisors(h) if w % d == 0]
            problems.append(
                f"patch {p} does not divide the {h}x{w} images; patches that do: {', '.join(map(str, fits))}"
            )
        return problems

    def fit(self, o, x_train):
        x = x_train if x_train.ndim == 4 else x_train[..., None]
        given = _explicit_stats(o, x.shape[3])
        if given is not None:  # the user's statistics (e.g. a dataset's published ones) replace the split's
            return {"input_shape": list(x_train.shape[1:]), "mean": given[0], "std": given[1]}
        mean, std = _chunked_moments(x, (0, 1, 2))
        return {
            "input_shape": list(x_train.shape[1:]),
            "mean": [round(float(m) / 255.0, 6) for m in mean],
            "std": [round(float(s) / 255.0, 6) for s in std],
        }

    def spec_fields(self, o, fitted):
        shape = fitted["input_shape"]
        h, w, c = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
        p = o["patch"]
        return {"input_shape": shape, "seq_len": (h // p) * (w // p), "token_dim": p * p * c}

    def build_preprocess(self, o, fitted):
        return ImagePatches(o["patch"], tuple(fitted["mean"]), tuple(fitted["std"]))


class SequenceKind(InputKind):
    name = "sequence"
    description = "float32 sequences [T, F] (or tabular [T] features), patch steps a token, standardised"
    input_dtype = "float32"
    options = {
        "patch": TaskOption(type=int, default=1, help="consecutive steps a token; divides T"),
        "standardize": TaskOption(
            type=str,
            default="feature",
            help="feature: one mean/std per feature F (time series); position: per step and feature (tables)",
        ),
        "mean": _stat_option("in the data's units"),
        "std": _stat_option("in the data's units"),
    }

    def check_options(self, o):
        return _check_stats(o)

    def check_inputs(self, o, x, where):
        problems = []
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            problems.append(f"{where} sequences are {x.dtype}; need numbers (float32)")
            return problems
        if x.ndim not in (2, 3):
            problems.append(f"{where} sequences have shape {list(x.shape)}; need [N, T, F] or [N, T]")
            return problems
        if np.issubdtype(x.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
            if bad:
                problems.append(f"{where} has {bad} example(s) with NaN or inf values; drop or impute them")
        t, p = x.shape[1], o["patch"]
        if p < 1 or t % p:
            problems.append(
                f"patch {p} does not divide the sequence length {t}; patches that do: "
                + ", ".join(map(str, _divisors(t)))
            )
        if o["standardize"] not in ("feature", "position"):
            problems.append(f"standardize must be feature or position (got {o['standardize']!r})")
        return problems + _check_stat_lengths(o, x.shape[2] if x.ndim == 3 else 1, "feature")

    def fit(self, o, x_train):
        x = x_train if x_train.ndim == 3 else x_train[..., None]  # (N, T, F)
        given = _explicit_stats(o, x.shape[2])
        if given is not None:  # one mean/std per feature, the same at every step
            return {"input_shape": list(x_train.shape[1:]), "mean": given[0], "std": given[1]}
        mean, std = _chunked_moments(x, (0, 1) if o["standardize"] == "feature" else (0,))
        return {"input_shape": list(x_train.shape[1:]), "mean": mean.round(8).tolist(), "std": std.round(8).tolist()}

    def spec_fields(self, o, fitted):
        shape = fitted["input_shape"]
        f = shape[1] if len(shape) == 2 else 1
        return {"input_shape": shape, "seq_len": shape[0] // o["patch"], "token_dim": o["patch"] * f}

    def build_preprocess(self, o, fitted):
        return SequencePatches(o["patch"], fitted["mean"], fitted["std"])


class TokensKind(InputKind):
    name = "tokens"
    description = "int64 token ids [T] padded at the end with pad_id; read at the last real token"
    input_dtype = "int64"
    options = {
        "vocab_size": TaskOption(type=int, default=0, help="ids are 0..vocab_size-1; 0 = the largest id + 1"),
        "pad_id": TaskOption(type=int, default=0, help="the padding id (padding only at the end of a row)"),
    }

    def check_inputs(self, o, x, where):
        problems = []
        if not np.issubdtype(x.dtype, np.integer):
            return [f"{where} token ids are {x.dtype}; need integers (int64)"]
        if x.ndim != 2:
            return [f"{where} token ids have shape {list(x.shape)}; need [N, T] (pad shorter rows with pad_id)"]
        pad, vocab = o["pad_id"], o["vocab_size"]
        if x.size and x.min() < 0:
            problems.append(f"{where} has negative token ids (smallest {int(x.min())})")
        if vocab and x.size and x.max() >= vocab:
            problems.append(f"{where} has token id {int(x.max())}, outside vocab_size {vocab} (ids 0..{vocab - 1})")
        if vocab and not 0 <= pad < vocab:
            problems.append(f"pad_id {pad} is outside the vocabulary 0..{vocab - 1}")
        real = x != pad
        empty = int(np.count_nonzero(~real.any(axis=1)))
        if empty:
            problems.append(f"{where} has {empty} row(s) of padding only; every example needs a real token")
        gaps = int(np.count_nonzero((real[:, 1:] & ~real[:, :-1]).any(axis=1)))
        if gaps:
            problems.append(
                f"{where} has {gaps} row(s) with padding (id {pad}) before a real token; pad at the end only"
            )
        return problems

    def fit(self, o, x_train):
        vocab = o["vocab_size"] or int(max(x_train.max(), o["pad_id"])) + 1
        return {"input_shape": list(x_train.shape[1:]), "vocab_size": vocab}

    def spec_fields(self, o, fitted):
        return {
            "input_shape": fitted["input_shape"],
            "seq_len": fitted["input_shape"][0],
            "vocab_size": fitted["vocab_size"],
        }

    def build_preprocess(self, o, fitted):
        return PaddedTokenIds(o["pad_id"])


class BitsKind(InputKind):
    name = "bits"
    description = "the paper's bit tasks, generalised: strings x length bits in, length bits out"
    input_dtype = "uint8"
    multi_output = True
    options = {
        "strings": TaskOption(type=int, default=0, help="bit strings an example holds; 0 = width / length"),
        "length": TaskOption(type=int, default=0, help="bits a string, and bits predicted; 0 = the labels' width"),
        "patch": TaskOption(type=int, default=1, help="bits a token; divides length"),
    }

    def resolve_options(self, o, x_train, y_train):
        o = dict(o)
        if not o["length"] and y_train.ndim == 2:
            o["length"] = int(y_train.shape[1])
        if not o["strings"] and o["length"] and x_train.ndim == 2:
            o["strings"] = int(x_train.shape[1]) // o["length"]
        return o

    def check_inputs(self, o, x, where):
        if x.ndim != 2:
            return [f"{where} bits have shape {list(x.shape)}; need [N, strings * length]"]
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            return [f"{where} bits are {x.dtype}; need integers 0, 1 (and 2 = masked)"]
        problems = []
        if x.size and (x.min() < 0 or x.max() > 2):
            problems.append(f"{where} has values outside 0, 1, 2 (0/1 bits, 2 = masked)")
        s, n, p = o["strings"], o["length"], o["patch"]
        if s * n != x.shape[1]:
            problems.append(f"{where} examples have {x.shape[1]} bits, not strings x length = {s} x {n}")
        if n and (p < 1 or n % p):
            problems.append(
                f"patch {p} does not divide length {n}; patches that do: " + ", ".join(map(str, _divisors(n)))
            )
        return problems

    def check_labels(self, o, y, n, where):
        if y.ndim != 2 or len(y) != n or y.shape[1] != o["length"]:
            return [f"{where} labels have shape {list(y.shape)}; need [{n}, {o['length']}] (length bits each)"]
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            return [f"{where} labels are {y.dtype}; need bits 0/1 as integers"]
        return []

    def fit(self, o, x_train):
        return {"input_shape": list(x_train.shape[1:])}

    def spec_fields(self, o, fitted):
        width, p = fitted["input_shape"][0], o["patch"]
        return {
            "input_shape": fitted["input_shape"],
            "seq_len": width // p,
            "token_dim": p,
            "read_tokens": o["length"] // p,
            "outputs_per_token": p,
        }

    def build_preprocess(self, o, fitted):
        return BitPatches(o["patch"])
