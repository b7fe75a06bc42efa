"""Command-line flags derived from the config classes, so a flag's type, choices, default and
help cannot drift from the config key it sets."""

from __future__ import annotations

import argparse
import types
import typing

from pydantic import BaseModel


def _flag_type(annotation):
    """(argparse type, choices) of a field annotation; ``X | None`` counts as ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    return annotation, None


def flag_name(field: str, prefix: str = "") -> str:
    """The command-line flag of a config field: ``--<prefix><field with dashes>``."""
    return "--" + prefix + field.replace("_", "-")


def add_fields(group, model: type[BaseModel], names, prefix: str = "") -> None:
    """One ``--<prefix><name>`` flag per field of ``model`` in ``names``."""
    for name in names:
        field = model.model_fields[name]
        flag = flag_name(name, prefix)
        help_text = field.description or None
        if field.annotation is bool:
            group.add_argument(flag, dest=prefix.replace("-", "_") + name, action="store_true",
                               help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        default = field.default
        shown = f"{help_text} " if help_text else ""
        group.add_argument(flag, dest=prefix.replace("-", "_") + name, type=kind,
                           choices=choices, default=default,
                           help=f"{shown}(default {default})")


def field_values(args: argparse.Namespace, names, prefix: str = "") -> dict:
    """The values of the flags ``add_fields`` made, keyed by field name."""
    return {name: getattr(args, prefix.replace("-", "_") + name) for name in names}
