"""Reading a run config: a YAML file with dotted overrides on top, validated by pydantic, every
mistake reported as one line naming the dotted key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError, first_line
from .run import Config


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {key} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text!r}: use key=value, e.g. --set rounds=2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _user_location(loc: tuple, tree: Any) -> str:
    """The dotted key as the user wrote it: pydantic puts a tagged union's tag into the
    location (``strategy.fedavg.proximal_mu``), which is not a key of the config."""
    parts, node = [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue  # the union member's tag
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


def _first_error(exc: ValidationError, source: str, tree: Any = None) -> str:
    err = exc.errors()[0]
    where = _user_location(err["loc"], tree)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling against configs/demo.yaml)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "union_tag_invalid":  # registries (strategies, emulator methods)
        ctx = err["ctx"]
        return (f"{source}: {where}.name: unknown name {ctx['tag']!r}; use one of "
                f"{ctx['expected_tags']}")
    elif err["type"] == "union_tag_not_found":
        return f"{source}: {where}.name: required key is missing"
    got = f" (got {err['input']!r})" if err["type"] not in {"extra_forbidden", "missing"} and \
        not isinstance(err.get("input"), dict) else ""
    return f"{source}: {where + ': ' if where else ''}{msg}{got}"


def build_section(name: str, values: dict) -> BaseModel:
    """One section (e.g. ``split`` from CLI flags), with the same one-line errors."""
    section = Config.model_fields[name].annotation
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        raise UserError(_first_error(exc, name, values)) from None


def load(path: str | Path | None, overrides: list[str] | dict | None = None,
         overrides_from: str | None = None) -> Config:
    """Config from a YAML file (or none) with dotted overrides applied on top; a mistake in an
    override is reported as ``<overrides_from> KEY`` (e.g. ``--set rounds``) when given."""
    tree: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--config: {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config: {path} is not valid YAML "
                            f"({first_line(exc)})") from None
        if not isinstance(tree, dict):
            raise UserError(f"--config: {path} must hold a mapping of keys")
        source = str(path)
    items = list(overrides.items() if isinstance(overrides, dict) else
                 (parse_override(o) for o in overrides or []))
    for key, value in items:
        set_dotted(tree, key, value)
    if isinstance(tree.get("split"), dict) and isinstance(tree.get("model"), str):
        from ..emulators.recipes import with_recipe  # a named recipe, sized to the model

        tree["split"] = with_recipe(tree["split"], tree["model"])
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        where = _user_location(exc.errors()[0]["loc"], tree)
        overridden = [key for key, _ in items if overrides_from and (
            where == key or where.startswith(key + ".") or key.startswith(where + "."))]
        # a mistake in an override is the override's, not the file's
        raise UserError(_first_error(exc, f"{overrides_from} {overridden[0]}" if overridden else source,
                                     tree)) from None


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
