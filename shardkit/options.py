"""The base of shardkit's option sets, and their command-line form.

Every option is defined once, as a field of an :class:`Options` model: its type,
default, bounds, choices and description. :func:`add_options` makes the
command-line options of a model's fields. They carry no default of their own: an
option the user did not give is absent from the parsed namespace, so the model's
default (or its validator, for a default that depends on another option) applies;
:func:`given` reads back the options that were given.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from shardkit.errors import ConfigError
from shardkit.schema import format_validation_error


class Options(BaseModel):
    """Base of shardkit's option sets: frozen, unknown keys refused, errors as one plain :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def create(cls, **options: Any) -> Self:
        """Like the constructor, with option errors as one :class:`ConfigError`."""
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None


def flag(name: str) -> str:
    """The command-line spelling of the field ``name``: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    fields: Iterable[str] | None = None,
    *,
    exclude: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add one option to ``parser`` per field of ``model`` (``fields``, default: all but ``exclude``), in order.

    Type, bounds, choices, required and help (the field's description and default) come from the field.
    ``overrides`` maps a field to argparse keywords that only spell the option: ``flag`` (another name; a name
    without dashes makes a positional; ``--no-...`` a switch that turns the field off), ``metavar``, ``required``
    (False where the command checks it), ``action="append"`` (a repeated option for a list, instead of commas).
    """
    overrides = overrides or {}
    excluded = set(exclude)
    for name in list(fields) if fields is not None else [n for n in model.model_fields if n not in excluded]:
        spelling = dict(overrides.get(name, {}))
        if {"default", "help", "dest"} & set(spelling):
            raise ValueError(f"{model.__name__}.{name}: the default, help and name of an option come from the model")
        name_or_flag = spelling.pop("flag", flag(name))
        keywords = _keywords(model.model_fields[name], name_or_flag, spelling.get("action"))
        keywords.update(spelling)
        if name_or_flag.startswith("-"):
            parser.add_argument(name_or_flag, dest=name, default=argparse.SUPPRESS, **keywords)
        else:  # a positional: always given, named after the field
            keywords.pop("required", None)
            parser.add_argument(name, **keywords)


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` the user gave on the command line (see :func:`add_options`)."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def option_help(info: FieldInfo) -> str:
    """The help of a field's option: its description, then its default where that is a plain value."""
    text = info.description or ""
    default = None if info.is_required() or info.default_factory else info.default
    if isinstance(default, tuple | list):  # as the option spells it: values between commas
        default = ",".join(map(str, default))
    if not (default is None or isinstance(default, bool) or default == ""):
        text += f" (default: {default.value if isinstance(default, Enum) else default})"
    return text


def _keywords(info: FieldInfo, name_or_flag: str, action: str | None) -> dict[str, Any]:
    kind = _without_none(info.annotation)
    keywords: dict[str, Any] = {"help": option_help(info).replace("%", "%%")}
    if kind is bool:
        keywords["action"] = "store_false" if name_or_flag.startswith("--no-") else "store_true"
        return keywords
    if info.is_required():
        keywords["required"] = True
    many = get_origin(kind) in (list, tuple)
    if many and action == "append":
        keywords["type"] = _converter(get_args(kind)[0], [])
    elif many:
        keywords["type"] = _converter(kind, info.metadata, split=True)
    else:
        keywords["type"] = _converter(kind, info.metadata)
    if choices := _choices(kind, info):
        keywords["choices"] = choices
    return keywords


def _without_none(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _choices(kind: Any, info: FieldInfo) -> list[Any] | None:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [member.value for member in kind]
    if get_origin(kind) is Literal:
        return list(get_args(kind))
    extra = info.json_schema_extra
    return list(extra["enum"]) if isinstance(extra, dict) and "enum" in extra else None


def _converter(kind: Any, metadata: list[Any], split: bool = False) -> Callable[[str], Any]:
    """Text -> the field's value, checked as the model checks it (bounds included), or argparse's error."""
    adapter = TypeAdapter(Annotated[kind, *metadata] if metadata else kind)

    def convert(text: str) -> Any:
        try:
            return adapter.validate_python([part for part in text.split(",") if part] if split else text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg']}, got {text!r}") from None

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert
