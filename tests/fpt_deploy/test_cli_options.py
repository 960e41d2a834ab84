"""Options derived from config dataclasses: names, types, defaults, choices, help, aliases, all written once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from fpt_deploy.cli_options import option_fields, options_from
from fpt_deploy.errors import ConfigError, collect


def _colours() -> list[str]:
    return ["red", "green"]


@dataclass(kw_only=True)
class Settings:
    repo: Path = field(metadata={"help": "Where it lives."})
    size: int = field(default=3, metadata={"help": "How many.", "flags": ("--size", "-n")})
    rate: float | None = field(default=None, metadata={"help": "How fast.", "aliases": ("--speed",)})
    fast: bool = field(default=False, metadata={"help": "Go fast."})
    auto: bool | None = field(default=None, metadata={"help": "Decide later."})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "Which mode."})
    colour: str = field(default="red", metadata={"help": "Registered colour.", "choices": _colours})
    tags: list[str] = field(default_factory=list, metadata={"help": "Repeatable tag."})
    kinds: list[Literal["x", "y"]] = field(default_factory=lambda: ["x"], metadata={"help": "Kinds."})
    sizes: tuple[int, ...] = field(default=(), metadata={"help": "Repeatable sizes, kept a tuple."})
    secret: int = field(default=7, metadata={"cli": False, "help": "Set by the library only."})

    def __post_init__(self) -> None:
        collect([f"size must be >= 1 (got {self.size})"] if self.size < 1 else [])


def _app(seen: list, **kwargs) -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)  # as fpt_deploy.cli: plain help (defaults in [brackets])

    @app.command()
    @options_from(Settings, **kwargs)
    def run(config: Callable[..., Settings], extra: str = typer.Option("e", help="Command-only.")) -> None:
        seen.append((config(), extra))

    @app.command()
    def other() -> None:  # two commands, so `run` is a subcommand as in fpt-deploy
        pass

    return app


def _invoke(*args, **kwargs):
    seen: list = []
    result = CliRunner().invoke(_app(seen, **kwargs), ["run", *args])
    return result, seen


def test_defaults_come_from_the_dataclass():
    result, seen = _invoke("--repo", "r")
    assert result.exit_code == 0, result.output
    config, extra = seen[0]
    assert config == Settings(repo=Path("r")) and extra == "e"


def test_every_kind_of_field_parses():
    result, seen = _invoke(
        "--repo", "r", "-n", "5", "--speed", "0.5", "--fast", "--no-auto", "--mode", "b", "--colour", "green",
        "--tags", "t1", "--tags", "t2", "--kinds", "y", "--kinds", "x", "--extra", "z", "--sizes", "4", "--sizes", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config, extra = seen[0]
    assert (config.size, config.rate, config.fast, config.auto, config.mode, config.colour) == (
        5, 0.5, True, False, "b", "green",
    )  # fmt: skip
    assert config.tags == ["t1", "t2"] and config.kinds == ["y", "x"] and extra == "z"
    assert all(type(k) is str for k in config.kinds)  # plain strings, as the dataclass declares
    assert config.sizes == (4, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "c"], "--mode"),
        (["--colour", "blue"], "--colour"),
        (["--kinds", "z"], "--kinds"),
        (["--size", "many"], "--size"),
        (["--secret", "1"], "No such option"),
    ],
)
def test_bad_values_and_unknown_options_are_refused(args, message):
    result, seen = _invoke("--repo", "r", *args)
    assert result.exit_code == 2 and not seen and message in result.output


def test_required_fields_are_required_and_validation_still_runs():
    result, _ = _invoke()
    assert result.exit_code == 2 and "--repo" in result.output
    result, seen = _invoke("--repo", "r", "--size", "0")  # the dataclass's own check, not a CLI copy of it
    assert isinstance(result.exception, ConfigError) and "size must be >= 1" in str(result.exception) and not seen


def test_help_shows_help_defaults_and_choices_but_no_hidden_alias():
    result = CliRunner().invoke(_app([]), ["run", "--help"], env={"COLUMNS": "200"})
    text = result.output
    assert "How many." in text and "3" in text and "--no-fast" in text and "a|b" in text and "red|green" in text
    assert "--speed" not in text and "--secret" not in text and "Command-only." in text


def test_exclude_and_only():
    result, seen = _invoke("--repo", "r", exclude=("mode",))
    assert result.exit_code == 0 and seen[0][0].mode == "a"
    assert _invoke("--repo", "r", "--mode", "b", exclude=("mode",))[0].exit_code == 2
    result, seen = _invoke("--size", "4", only=("size",))
    assert result.exit_code != 0  # repo is required by the dataclass and not an option: the command must pass it


def test_a_field_added_later_appears_by_itself():
    @dataclass(kw_only=True)
    class Grown(Settings):
        limit: int = field(default=9, metadata={"help": "A limit added by another engineer."})

    app, seen = typer.Typer(rich_markup_mode=None), []

    @app.command()
    @options_from(Grown)
    def run(config: Callable[..., Grown]) -> None:
        seen.append(config())

    @app.command()
    def other() -> None:
        pass

    assert CliRunner().invoke(app, ["run", "--repo", "r", "--limit", "2"]).exit_code == 0
    assert seen[0].limit == 2


def test_a_field_without_help_is_a_mistake_found_when_the_command_is_built():
    @dataclass(kw_only=True)
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match="NoHelp.x needs metadata"):
        options_from(NoHelp)(lambda config: None)


def test_the_real_commands_take_their_options_from_their_configs():
    from fpt_deploy.serving.config import PredictConfig, RuntimeConfig, ServeConfig
    from fpt_deploy.serving.runtimes import runtime_names

    from fpt_deploy.cli import app

    runner = CliRunner()
    serve_help = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "250"}).output
    predict_help = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "250"}).output
    for f in dataclasses.fields(RuntimeConfig):  # serve and predict share every runtime option
        flag = "--" + f.name.replace("_", "-")
        assert flag in serve_help and flag in predict_help, flag
    for f in dataclasses.fields(ServeConfig):
        assert "--" + f.name.replace("_", "-") in serve_help
    assert "--task" in predict_help and "--input" in predict_help and PredictConfig.__doc__
    assert "|".join(runtime_names()) in serve_help  # the runtime choices come from the registry


def test_choice_problems_read_the_literal_annotations():
    from fpt_deploy.choices import choice_problems

    @dataclass(kw_only=True)
    class Picky:
        mode: Literal["a", "b"] = "a"
        maybe: Literal["x"] | None = None
        many: list[Literal["p", "q"]] = field(default_factory=list)
        free: str = "anything"

    assert choice_problems(Picky(many=["p", "q"])) == []
    problems = choice_problems(Picky(mode="c", maybe="y", many=["p", "z"]))
    assert problems == [
        "mode must be one of a, b (got 'c')",
        "maybe must be one of x (got 'y')",
        "many must be one of p, q (got 'z')",
    ]


def test_building_the_cli_imports_no_framework():
    """Every command's options come from config modules that load without torch or a runtime (quick --help)."""
    import subprocess
    import sys

    heavy = ("torch", "onnxruntime", "fastapi", "uvicorn", "transformers", "tensorrt")
    code = f"import sys, fpt_deploy.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@dataclass(kw_only=True)
class Inner:
    depth: int = field(default=2, metadata={"help": "How deep."})
    kinds: tuple[Literal["x", "y"], ...] = field(default=("x",), metadata={"help": "Kinds."})


@dataclass(kw_only=True)
class Outer:
    name: str = field(default="n", metadata={"help": "A name."})
    inner: Inner = field(default_factory=Inner, metadata={"help": "Nested."})


def test_a_nested_config_dataclass_is_flattened_into_options_of_its_own_names():
    app, seen = typer.Typer(rich_markup_mode=None), []

    @app.command()
    @options_from(Outer)
    def run(config: Callable[..., Outer]) -> None:
        seen.append(config())

    @app.command()
    def other() -> None:
        pass

    runner = CliRunner()
    assert runner.invoke(app, ["run", "--depth", "5", "--kinds", "y", "--kinds", "x"]).exit_code == 0
    assert runner.invoke(app, ["run", "--name", "m"]).exit_code == 0
    assert seen[0].inner == Inner(depth=5, kinds=("y", "x")) and seen[0].name == "n"
    assert seen[1].inner == Inner() and seen[1].name == "m"  # nothing given: the nested default
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "120"}).output
    assert "--depth" in text and "[default: 2]" in text and "--inner" not in text
    assert option_fields(Outer) == ["name", "depth", "kinds"]


def test_train_takes_the_model_options_under_their_own_names():
    from fpt_deploy.training.config import TrainConfig

    from fpt_deploy.model_options import ModelOptions

    assert {f.name for f in dataclasses.fields(ModelOptions)} <= set(option_fields(TrainConfig))
    assert "model" not in option_fields(TrainConfig)
