"""A config type made from a registry of config classes: the one whose ``name`` is given
(``strategy: {name: fedprox, ...}``), or the default one when ``name`` is left out."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag


def tagged_union(registry: dict[str, type], default: str | None = None):
    """The pydantic type of "one of ``registry``'s classes, chosen by ``name``"."""

    def tag(value):
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", default)

    members = tuple(Annotated[cls, Tag(name)] for name, cls in registry.items())
    return Annotated[Union[members], Discriminator(tag)]
