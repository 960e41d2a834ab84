"""Declared tasks: a user's own task from arrays or an image folder, described by options, no Python.

    fpt-deploy train --task-file digits.toml
    fpt-deploy train --task custom -o name=digits -o kind=image -o data=data/digits -o patch=2

A declaration names the task, its input kind (``fpt_deploy.tasks.kinds``), its data
(``fpt_deploy.tasks.sources``) and optionally its class names and training recipe. Building the task
reads the data, checks everything (every problem in one ``TaskDataError``), learns the kind's
statistics from the training split, and freezes the result into the task's options: the checkpoint's
config and the repository's ``task.json`` carry them, so evaluation, export and serving rebuild the
task from them without the declaration file (docs/declared-tasks.md).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fpt_deploy.errors import ConfigError, DataUnavailableError, TaskDataError
from fpt_deploy.tasks.base import Task, TaskData, TaskOption, TaskSpec
from fpt_deploy.tasks.kinds import InputKind, get_kind, kind_names
from fpt_deploy.tasks.recipe import Recipe
from fpt_deploy.tasks.sources import Examples, read_source, stratified_split
from fpt_deploy.taskspec import parse_option_value

log = logging.getLogger(__name__)

COMMON_OPTIONS = {
    "name": TaskOption(type=str, default="", help="the task's name (what clients call it)"),
    "kind": TaskOption(type=str, default="", help="input kind: image, sequence, tokens or bits"),
    "data": TaskOption(type=str, default="", help=".npz (x, y[, x_test, y_test, labels]) or image folder"),
    "test_data": TaskOption(type=str, default="", help="held-out .npz or image folder (else a seeded split)"),
    "test_fraction": TaskOption(type=float, default=0.2, help="held-out share of each class without test_data"),
    "split_seed": TaskOption(type=int, default=0, help="seed of that split"),
    "labels": TaskOption(type=str, default="", help="class names, comma-separated (a list in TOML)"),
    "description": TaskOption(type=str, default="", help="one line for listings"),
}
RECIPE_KEYS = ("lr", "epochs", "steps", "schedule")
LIST_KEYS = ("labels", "mean", "std")  # text options that a TOML file may give as a list (or one number)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FITTED, RECIPE, SPLIT = "fitted", "recipe", "split"  # keys the built task adds to its options


class DeclaredTask(Task):
    """A task built from a declaration; ``options`` hold the frozen declaration (see module doc)."""

    name = "custom"
    description = "your own task: --task-file FILE.toml, or -o name=... -o kind=... -o data=... (kinds: " + (
        ", ".join(kind_names()) + ")"
    )
    declared_options = COMMON_OPTIONS

    def __init__(
        self, *, max_positions: int | None = None, name_taken: Callable[[str], bool] | None = None, **options: Any
    ) -> None:
        """``options``: a declaration (``file=`` a TOML file, and/or the fields), or a frozen one.

        ``max_positions``: the backbone's, when known; a task with more tokens is refused.
        ``name_taken``: whether a registered task has a name (the task registry passes its own).
        """
        if "file" in options:
            from fpt_deploy.tasks.specfile import read_task_file

            options = {**read_task_file(Path(options.pop("file"))), **options}
        self._splits: dict[str, TaskData] = {}
        if FITTED in options:
            self._rebuild(options)
        else:
            self._declare(options, max_positions, name_taken)
        self.name = self.options["name"]
        self.description = self.options["description"] or f"declared {self.options['kind']} task"
        self.recipe = Recipe.from_mapping(self.options.get(RECIPE, {}))
        self.spec = self.build_spec()

    # -- building -----------------------------------------------------------------------------------

    def _parse(self, options: dict, problems: list[str]) -> tuple[dict, InputKind | None, dict]:
        """(typed options, kind, recipe values); problems appended, nothing raised."""
        options = dict(options)
        recipe = dict(options.pop(RECIPE, None) or {})
        recipe |= {k: options.pop(k) for k in RECIPE_KEYS if k in options}
        for key in LIST_KEYS:  # a TOML list or number, written as the command line's comma-separated text
            value = options.get(key)
            if isinstance(value, (list, tuple)):
                options[key] = ",".join(str(v) for v in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                options[key] = str(value)
        kind = None
        kind_name = str(options.get("kind", ""))
        if not kind_name:
            problems.append(f"kind is missing; choose one of {', '.join(kind_names())}")
        elif kind_name not in kind_names():
            problems.append(f"unknown kind {kind_name!r}; choose one of {', '.join(kind_names())}")
        else:
            kind = get_kind(kind_name)
        declared = {**COMMON_OPTIONS, **(kind.options if kind else {})}
        unknown = sorted(set(options) - set(declared) - {FITTED, SPLIT})
        if unknown:
            problems.append(
                f"unknown option(s) {', '.join(unknown)}; a {kind_name or 'declared'} task takes "
                f"{', '.join(sorted([*declared, *RECIPE_KEYS]))}"
            )
        typed = {}
        for key, option in declared.items():
            try:
                typed[key] = parse_option_value(key, option.type, options.get(key, option.default))
            except ConfigError as e:
                problems.append(str(e))
        if kind is not None and all(k in typed for k in kind.options):
            problems += kind.check_options(typed)
        for key in ("name", "data"):
            if not typed.get(key):
                problems.append(f"{key} is missing")
        if typed.get("name") and not NAME_PATTERN.match(typed["name"]):
            problems.append(f"name {typed['name']!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not 0 < typed.get("test_fraction", 0.2) < 1:
            problems.append(f"test_fraction must be between 0 and 1 (got {typed['test_fraction']})")
        try:
            recipe = Recipe.from_mapping(recipe).to_json()
        except ConfigError as e:
            problems.append(str(e))
        return typed, kind, recipe

    def _rebuild(self, options: dict) -> None:
        """From a frozen declaration (a checkpoint's or a task.json's): no data is read."""
        problems: list[str] = []
        typed, kind, recipe = self._parse(options, problems)
        if problems:
            raise ConfigError(f"stored declaration of task {options.get('name')!r} is invalid: {'; '.join(problems)}")
        self.kind = kind
        self.options = {**typed, RECIPE: recipe, SPLIT: options.get(SPLIT, ""), FITTED: options[FITTED]}

    def _declare(self, options: dict, max_positions: int | None, name_taken: Callable[[str], bool] | None) -> None:
        """Read and check the data, learn the statistics, freeze the declaration."""
        problems: list[str] = []
        o, kind, recipe = self._parse(options, problems)
        if problems:  # options that do not parse: the data cannot be checked against them
            kind = None
        name = o.get("name") or "custom"
        if o.get("name") and name_taken is not None and name_taken(o["name"]):
            problems.append(f"name {o['name']!r} is taken by a registered task; pick another name")
        train = test = None
        split = ""
        if o.get("data"):
            train, test = read_source(Path(o["data"]), problems)
            if o.get("test_data"):
                if test is not None:
                    problems.append(f"{o['data']} already holds x_test/y_test; drop test_data or those arrays")
                classes = train.label_names if train is not None and Path(o["data"]).is_dir() else ()
                test, _ = read_source(Path(o["test_data"]), problems, "test_data", classes)
        if kind is not None and train is not None:
            if test is None and len(train.x) == len(train.y):
                train_idx, test_idx = stratified_split(train.y, o["test_fraction"], o["split_seed"])
                split = (
                    f"held-out split: a seeded {'stratified ' if train.y.ndim == 1 else ''}split "
                    f"(test_fraction {o['test_fraction']}, split_seed {o['split_seed']}): "
                    f"{len(train_idx)} train, {len(test_idx)} held-out"
                )
                test = Examples(x=train.x[test_idx], y=train.y[test_idx], label_names=train.label_names)
                train = Examples(x=train.x[train_idx], y=train.y[train_idx], label_names=train.label_names)
            elif test is not None:
                split = f"held-out split: given ({len(train.y)} train, {len(test.y)} held-out)"
            else:
                problems.append(f"{o['data']} has {len(train.x)} examples but {len(train.y)} labels")
            o = kind.resolve_options(o, train.x, train.y)
        fitted: dict = {}
        if kind is not None and train is not None and test is not None:
            labels = _check_examples(kind, o, train, test, problems)
            if not problems:
                fitted = {**kind.fit(o, train.x), "labels": labels}
                seq_len = kind.spec_fields(o, fitted)["seq_len"]
                if max_positions is not None and seq_len > max_positions:
                    problems.append(
                        f"{seq_len} tokens an example exceed the backbone's {max_positions} positions; "
                        "use a larger patch or a backbone with more positions"
                    )
        if problems:
            problems = list(dict.fromkeys(problems))  # a problem of both splits' shared setting is said once
            raise TaskDataError(f"task {name!r}: {len(problems)} problem(s): " + "; ".join(problems))
        self.kind = kind
        self.options = json.loads(
            json.dumps(
                {
                    **o,
                    "data": _absolute(o["data"]),
                    "test_data": _absolute(o["test_data"]),
                    RECIPE: recipe,
                    SPLIT: split,
                    FITTED: fitted,
                }
            )
        )
        self._splits = {
            "train": TaskData(inputs=kind.cast(train.x), labels=train.y.astype(np.int64), source=self._source()),
            "test": TaskData(inputs=kind.cast(test.x), labels=test.y.astype(np.int64), source=self._source()),
        }

    def _source(self) -> str:
        o = self.options
        return f"{o['data']}" + (f" and {o['test_data']}" if o["test_data"] else "") + f"; {o[SPLIT]}"

    # -- the Task interface -------------------------------------------------------------------------

    def build_spec(self) -> TaskSpec:
        fitted = self.options[FITTED]
        labels = fitted["labels"]
        return TaskSpec(
            name=self.options["name"],
            input_dtype=self.kind.input_dtype,
            num_classes=len(labels),
            labels=labels,
            options=self.options,
            **self.kind.spec_fields(self.options, fitted),
        )

    def build_preprocess(self):
        return self.kind.build_preprocess(self.options, self.options[FITTED])

    def load_data(self, split: str, data_dir: Path | None = None, download: bool = False, seed: int = 0) -> TaskData:
        """The declared data's ``split``; ``data_dir`` replaces the recorded ``data`` path (moved data)."""
        if split not in self._splits or data_dir is not None:
            self._splits = self._reload(data_dir)
        return self._splits[split]

    def _reload(self, data_dir: Path | None) -> dict[str, TaskData]:
        """Both splits, re-read from the recorded paths and re-split with the recorded seed, then re-checked."""
        o = self.options
        data = Path(data_dir) if data_dir is not None else Path(o["data"])
        for path in (data, Path(o["test_data"]) if o["test_data"] else None):
            if path is not None and not path.exists():
                raise DataUnavailableError(
                    f"task {o['name']!r}: its data {path} is gone; evaluation and export validation need it "
                    f"(pass --data-dir with its new place)"
                )
        options = {k: v for k, v in o.items() if k not in (FITTED, SPLIT)}
        again = DeclaredTask(**{**options, "data": str(data)})
        expected = o[FITTED]
        if again.options[FITTED]["input_shape"] != expected["input_shape"] or (
            again.options[FITTED]["labels"] != expected["labels"]
        ):
            raise TaskDataError(
                f"task {o['name']!r}: the data at {data} no longer matches the trained task "
                f"(shape {again.options[FITTED]['input_shape']} vs {expected['input_shape']}, or other classes)"
            )
        return again._splits


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def _check_examples(kind: InputKind, o: dict, train: Examples, test: Examples, problems: list[str]) -> list[str]:
    """Every problem with both splits (appended); returns the class names."""
    label_problems = []
    for where, ex in (("training data", train), ("held-out data", test)):
        if len(ex.x) != len(ex.y):
            problems.append(f"{where} has {len(ex.x)} examples but {len(ex.y)} labels")
        if len(ex.x) == 0:
            problems.append(f"{where} is empty")
        problems += kind.check_inputs(o, ex.x, where)
        label_problems += kind.check_labels(o, ex.y, len(ex.x), where)
    problems += label_problems
    if train.x.ndim == test.x.ndim and train.x.shape[1:] != test.x.shape[1:]:
        problems.append(
            f"training examples have shape {list(train.x.shape[1:])} but held-out ones {list(test.x.shape[1:])}"
        )
    if kind.multi_output:
        return ["0", "1"]
    names = tuple(s.strip() for s in o["labels"].split(",") if s.strip()) if o["labels"] else train.label_names
    if label_problems:  # labels of the wrong shape or type: their values cannot be checked
        return list(names)
    all_y = np.concatenate([train.y, test.y])
    if len(all_y) == 0:
        return list(names)
    k = len(names) if names else int(all_y.max()) + 1
    if len(set(names)) != len(names):
        problems.append(f"class names repeat: {', '.join(names)}")
    bad = all_y[(all_y < 0) | (all_y >= k)]
    if len(bad):
        problems.append(
            f"labels must be integers 0..{k - 1} ({k} class names); found {', '.join(map(str, np.unique(bad)[:5]))}"
        )
    if k < 2:
        problems.append(f"a classifier needs at least 2 classes (found {k})")
    names = names or tuple(str(i) for i in range(k))
    for where, ex in (("training", train), ("held-out", test)):
        missing = sorted(set(range(k)) - set(np.unique(ex.y).tolist()))
        if missing and not len(bad):
            shown = ", ".join(repr(names[c]) for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
            problems.append(f"class(es) {shown} have no {where} example; every class needs examples in both splits")
    return list(names)
