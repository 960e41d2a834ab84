"""Training recipes that travel with tasks: what ``fpt-deploy train --task NAME`` uses when the user gives none.

A recipe names only what it recommends (``None`` leaves a setting to the global default). The training
settings resolve each of lr, epochs, steps and schedule as: the user's value, else the task's recipe,
else ``DEFAULT_RECIPE``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from fpt_deploy.errors import ConfigError, collect

Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A task's recommended optimisation settings; ``None`` means "no recommendation"."""

    lr: float | None = None  # Adam (peak) learning rate
    epochs: int | None = None  # passes over the training split
    steps: int | None = None  # total optimizer steps (overrides epochs)
    schedule: Schedule | None = None  # cosine (warmup, then decay to 0) or constant

    def __post_init__(self) -> None:
        problems = []
        if self.lr is not None and not self.lr > 0:
            problems.append(f"recipe lr must be > 0 (got {self.lr})")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"recipe {name} must be >= 1 (got {value})")
        if self.schedule not in (None, "cosine", "constant"):
            problems.append(f"recipe schedule must be cosine or constant (got {self.schedule!r})")
        collect(problems)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "recipe") -> Recipe:
        """A recipe from TOML or ``-o`` values (strings are parsed); unknown keys are reported."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
        parsed, problems = {}, []
        for key, kind in (("lr", float), ("epochs", int), ("steps", int), ("schedule", str)):
            if values.get(key) in (None, ""):
                continue
            try:
                parsed[key] = kind(values[key])
            except (TypeError, ValueError):
                problems.append(f"{where} {key}={values[key]!r} must be a {kind.__name__}")
        collect(problems)
        return cls(**parsed)


# What a task without a recipe trains with: the paper's lr 1e-3 and a short cosine run.
DEFAULT_RECIPE = Recipe(lr=1e-3, epochs=3, steps=None, schedule="cosine")


def resolve_recipe(given: dict[str, Any], task_recipe: Recipe | None) -> dict[str, Any]:
    """lr, epochs, steps and schedule: each the user's value (not None), else the task's, else the default.

    When the user gives ``epochs`` but no ``steps``, a recipe's ``steps`` does not apply: the user asked
    for a number of passes.
    """
    recipe = task_recipe or Recipe()
    out = {}
    for name in ("lr", "epochs", "steps", "schedule"):
        value = given.get(name)
        if value is None and not (name == "steps" and given.get("epochs") is not None):
            value = getattr(recipe, name)
        if value is None:
            value = getattr(DEFAULT_RECIPE, name)
        out[name] = value
    return out
