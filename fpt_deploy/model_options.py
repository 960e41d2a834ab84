"""How a task's model is built around the body (torch-free, so ``TrainConfig`` nests it and the CLI reads it).

``fpt_deploy.model.FPT`` builds from these; a checkpoint stores them (``"model"`` in its config.json),
so loading never guesses. ``fpt-deploy train`` takes each field as its own option (``--train``,
``--dropout``, ...): a field added here is an option there by itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import get_args

from fpt_deploy.errors import ConfigError, collect
from fpt_deploy.groups import FPT_GROUPS, TrainGroup, expand_groups, trains_body


@dataclass(kw_only=True)
class ModelOptions:
    """What trains, and the reference's other model options."""

    train: tuple[TrainGroup, ...] = field(
        default=FPT_GROUPS,
        metadata={
            "help": "Trained parameter groups, repeatable (default: the paper's FPT set input, positions, norms, "
            "output); attention/feedforward/all train body weights too: the export then writes that body as "
            "its own backbone."
        },
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout in the body and heads while training (0 = off; the reproduction grid uses "
            "the reference's 0.1)."
        },
    )
    input_gain: float = field(default=1.41, metadata={"help": "Orthogonal-init gain of a linear input layer."})
    input_hidden_layers: int = field(
        default=0, metadata={"help": "Hidden D->D ReLU layers after the input layer (not exportable)."}
    )
    output_hidden_layers: int = field(
        default=0, metadata={"help": "Hidden D->D ReLU layers before the output layer (not exportable)."}
    )

    def __post_init__(self) -> None:
        known = get_args(TrainGroup)
        self.train = tuple(dict.fromkeys(self.train))  # order kept, duplicates dropped
        problems = [
            f"unknown trained group {g!r} (choose from {', '.join(known)})" for g in self.train if g not in known
        ]
        if not self.train:
            problems.append("train at least one parameter group")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.input_hidden_layers < 0 or self.output_hidden_layers < 0:
            problems.append("hidden layer counts must be >= 0")
        collect(problems)

    @property
    def groups(self) -> frozenset[str]:
        """The trained groups with ``all`` expanded."""
        return expand_groups(self.train)

    @property
    def trains_body(self) -> bool:
        return trains_body(self.train)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "train": list(self.train)}

    @classmethod
    def from_json(cls, data: dict | None) -> ModelOptions:
        """Options a checkpoint recorded; a checkpoint from before they existed trained the FPT set."""
        data = dict(data or {})
        if "train" in data:
            data["train"] = tuple(data["train"])
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"unknown model options in the checkpoint ({e}); upgrade fpt-deploy") from e
