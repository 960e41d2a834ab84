"""Command-line options derived from config dataclasses: every default, choice and help is written once.

A config dataclass (``TrainConfig``, ``ExportConfig``, ``ServeConfig``, ``EngineConfig``, ...) declares
each setting as a keyword-only field::

    @dataclass(kw_only=True)
    class EngineConfig:
        repo: Path = field(default=Path("deploy"), metadata={"help": "Deployment repository."})
        fp16: bool = field(default=False, metadata={"help": "MatMul/Gemm in fp16."})
        precision: Literal["fp32", "fp16"] = field(default="fp32", metadata={"help": "..."})

and a command takes its options from it with ``options_from``::

    @app.command("build-engine")
    @user_errors
    @options_from(EngineConfig)
    def build_engine(config: Callable[..., EngineConfig]) -> None:
        result = build(config())

Each field becomes ``--field-name`` (underscores as dashes) with the field's type, default and help:

- ``bool`` is a ``--x/--no-x`` flag (``bool | None`` too: None means "not given, decide later");
- ``int``, ``float``, ``str``, ``Path`` and ``X | None`` of them; a field without a default is required;
- ``Literal["a", "b"]`` becomes a choice; ``metadata["choices"]`` (a callable returning names) gives
  choices read from a registry when the CLI is built (the runtimes of ``--runtime``);
- ``list[X]`` and ``tuple[X, ...]`` are repeatable (``--task a --task b``);
- a field whose type is itself a config dataclass (``TrainConfig.model: ModelOptions``) is flattened:
  each of its fields is an option of the command under its own name (``--dropout``), and the command
  builds the nested dataclass from those given (the rest keep its defaults);
- ``metadata["flags"]`` replaces the declarations (``("--task", "-t")``), ``metadata["aliases"]`` adds
  hidden old spellings (``("--backbone",)``), ``metadata["cli"] = False`` keeps a field off the command
  line (settings only the library sets).

The decorated command receives, in the parameter named by ``param`` (default ``config``), the config
class with the command line's values bound: calling it with keyword arguments builds the config (so
a command may add values it computes itself). A value the user did not give is left out, so the
dataclass default applies: fields added to a config later show up on its command by themselves.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import typer

from fpt_deploy.choices import unwrap_optional

_SCALARS = (bool, int, float, str, Path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Option:
    """One field as typer sees it."""

    field: str  # the config field it fills
    nested: str | None = None  # the flattened dataclass field that holds ``field`` (None: the config's own)
    param: str  # the Python parameter name of the command
    annotation: Any
    info: typer.models.OptionInfo
    container: type | None = None  # list or tuple for a repeatable option: what the config receives


def options_from(
    config_cls: type, *, param: str = "config", exclude: Iterable[str] = (), only: Iterable[str] | None = None
) -> Callable:
    """Decorator: the command's options are ``config_cls``'s fields (see the module docstring).

    ``exclude`` leaves fields to the command itself; ``only`` takes just those fields. Stack the
    decorator once per config a command builds; option names must not clash.
    """
    excluded, wanted = set(exclude), None if only is None else set(only)

    def decorate(fn: Callable) -> Callable:
        options = [
            opt
            for f in dataclasses.fields(config_cls)
            if f.name not in excluded and (wanted is None or f.name in wanted) and f.metadata.get("cli", True)
            for opt in _field_options(config_cls, f)
        ]
        signature = inspect.signature(fn)
        if param not in signature.parameters:
            raise TypeError(f"{fn.__name__} needs a parameter {param!r} to receive the {config_cls.__name__}")
        own = [p for name, p in signature.parameters.items() if name != param]
        clash = {p.name for p in own} & {o.param for o in options}
        if clash:
            raise TypeError(f"{fn.__name__}: options {', '.join(sorted(clash))} are declared twice")

        @functools.wraps(fn)
        def command(**kwargs):
            values: dict[str, Any] = {}
            nested: dict[str, dict[str, Any]] = {}
            for opt in options:
                value = kwargs.pop(opt.param)
                if value is None or (isinstance(value, (list, tuple)) and not value):
                    continue  # not given: the dataclass default applies
                if opt.container is not None:
                    value = opt.container(v.value if isinstance(v, enum.Enum) else v for v in value)
                (values if opt.nested is None else nested.setdefault(opt.nested, {})).setdefault(opt.field, value)
            hints = typing.get_type_hints(config_cls)
            for name, given in nested.items():
                values[name] = hints[name](**given)
            return fn(**{param: functools.partial(config_cls, **values)}, **kwargs)

        parameters = own + [
            inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.info, annotation=o.annotation)
            for o in options
        ]
        command.__signature__ = signature.replace(parameters=_keyword_only(parameters))
        hints = _hints(fn, own)
        command.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in own} | {
            o.param: o.annotation for o in options
        }
        del command.__wrapped__  # typer reads __signature__, never the decorated function's own
        return command

    return decorate


def _hints(fn: Callable, params: list[inspect.Parameter]) -> dict[str, Any]:
    """The resolved annotations of the command's own parameters (its config parameter's may not resolve)."""

    def stub() -> None:
        pass

    stub.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    return typing.get_type_hints(stub, globalns=fn.__globals__)


def _keyword_only(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]


def _field_options(config_cls: type, f: dataclasses.Field) -> list[_Option]:
    """The options of field ``f``: its own, or one per field of a nested config dataclass."""
    hint = typing.get_type_hints(config_cls)[f.name]
    if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return _options_of(config_cls, f)
    return [
        dataclasses.replace(opt, nested=f.name)
        for inner in dataclasses.fields(hint)
        if inner.metadata.get("cli", True)
        for opt in _options_of(hint, inner)
    ]


def _options_of(config_cls: type, f: dataclasses.Field) -> list[_Option]:
    """The typer option of field ``f`` and one hidden option per old spelling (``aliases``)."""
    hint = typing.get_type_hints(config_cls)[f.name]
    base, _ = unwrap_optional(hint)
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"{config_cls.__name__}.{f.name} needs metadata={{'help': ...}} to be an option")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    flag = "--" + f.name.replace("_", "-")
    decls = list(meta.get("flags", (flag,)))
    # The option itself defaults to None ("not given"); --help shows the dataclass default.
    kwargs: dict[str, Any] = {"help": meta["help"], "show_default": False}
    if not required:
        shown = field_default(config_cls, f.name)
        if isinstance(shown, bool):
            shown = decls[0].lstrip("-") if shown else "no-" + decls[0].lstrip("-")
        elif isinstance(shown, (list, tuple)):
            shown = ", ".join(map(str, shown))
        if shown not in (None, ""):
            kwargs["help"] = f"{meta['help']}  [default: {shown}]"
    container = typing.get_origin(base) if typing.get_origin(base) in (list, tuple) else None
    repeatable = container is not None
    if container is tuple and typing.get_args(base)[1:] != (Ellipsis,):
        raise TypeError(f"{config_cls.__name__}.{f.name}: a tuple option must be tuple[X, ...] (got {hint!r})")
    item = typing.get_args(base)[0] if repeatable else base
    choices = _choices(item, meta)
    if choices is not None:
        # typer turns a Literal into a choice; repeatable choices need an Enum (values read back as str)
        item = (
            enum.Enum(f"{f.name}_choices", {c: c for c in choices}, type=str) if repeatable else Literal[tuple(choices)]
        )
    elif item not in _SCALARS:
        raise TypeError(f"{config_cls.__name__}.{f.name}: no command-line form for {hint!r}")
    if item is bool and not repeatable and not any("/" in d for d in decls):
        decls[0] = f"{decls[0]}/--no-{decls[0].lstrip('-')}"
    annotation: Any = list[item] if repeatable else item
    if not required:
        annotation = annotation | None
    default = ... if required else None
    info = typer.Option(default, *decls, **kwargs)
    options = [_Option(field=f.name, param=f.name, annotation=annotation, info=info, container=container)]
    for i, alias in enumerate(meta.get("aliases", ())):
        hidden = typer.Option(None, alias, hidden=True)
        param = f"{f.name}__alias{i}"
        options.append(
            _Option(field=f.name, param=param, annotation=annotation | None, info=hidden, container=container)
        )
    return options


def _choices(item: Any, meta: typing.Mapping) -> list[str] | None:
    if typing.get_origin(item) is Literal:
        values = typing.get_args(item)
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"command-line choices are strings; {item!r} has others")
        return list(values)
    if "choices" in meta:
        return list(meta["choices"]())
    return None


def field_help(config_cls: type, name: str) -> str:
    """The help text a field declares (for a command-only option that fills that field itself)."""
    return next(f for f in dataclasses.fields(config_cls) if f.name == name).metadata["help"]


def option_fields(config_cls: type) -> list[str]:
    """The fields that become options, a nested config dataclass's by their own names (``dropout``)."""
    out = []
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += option_fields(hint)
        else:
            out.append(f.name)
    return out


def field_default(config_cls: type, name: str) -> Any:
    """The default a field declares (for a command that shows it, e.g. in a message)."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
