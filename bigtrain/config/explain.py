"""``bigtrain config --explain [KEY]``: what a config key is, read from the schema itself.

Each key prints as ``KEY: TYPE = DEFAULT  (RANGE)`` followed by its description (the field's
docstring, or the section's class docstring). A section prints itself and then every key under
it; no key prints the whole schema. Keys are spelled as in YAML (``checkpoint.async``); the
entries of a list of sections are ``KEY[].FIELD`` (``data.sources[].weight``; ``data.sources.weight``
finds it too). An unknown key is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import difflib
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from bigtrain.config.base import ConfigError
from bigtrain.config.run import RunConfig

WIDTH = 100  # descriptions wrap here (fixed, so the output does not depend on the terminal)


@dataclass(frozen=True)
class Key:
    """One key of the schema: its dotted YAML path, its field, and the section class it opens (if any)."""

    path: str
    field: FieldInfo
    section: type[BaseModel] | None


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds: itself, a list of it, or either or null."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[Key]:
    """Every key under ``model`` in schema order, each section before its own keys."""
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        section = _section_of(field.annotation)
        yield Key(path, field, section)
        if section is not None:
            is_list = typing.get_origin(field.annotation) is list or any(
                typing.get_origin(arg) is list for arg in typing.get_args(field.annotation))
            yield from keys(section, path + ("[]." if is_list else "."))


def _plain(path: str) -> str:
    return path.replace("[]", "")


def find(key: str) -> list[Key]:
    """``key`` and, for a section, every key under it. Raises ConfigError for an unknown key."""
    wanted = _plain(key.strip())
    every = list(keys())
    for i, item in enumerate(every):
        if _plain(item.path) == wanted:
            below = [k for k in every[i + 1:] if _plain(k.path).startswith(wanted + ".")]
            return [item, *below]
    close = difflib.get_close_matches(wanted, [_plain(k.path) for k in every], n=1)
    hint = f" (did you mean {close[0]}?)" if close else " (bigtrain config --explain lists every key)"
    raise ConfigError(f"{key}: unknown config key{hint}")


def type_name(annotation: Any) -> str:
    """A field's type as a user writes it in YAML: ``int``, ``bf16 | fp16``, ``list[str] | null``."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    """A default as YAML would read it back: null, true, 0.001, text, "\\n", [32, 64]."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value and value.strip() == value:
        return value
    return json.dumps(value)


def _range(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {_value(getattr(item, attr))}")
        if isinstance(item, annotated_types.MinLen):
            parts.append("not empty" if item.min_length == 1 else f"at least {item.min_length} long")
        if getattr(item, "pattern", None):
            parts.append(f"matching {item.pattern}")
    return f"  ({', '.join(parts)})" if parts else ""


def describe(key: Key) -> str:
    """``KEY: TYPE = DEFAULT  (RANGE)`` and the wrapped description under it."""
    field = key.field
    if key.section is not None and _section_of(field.annotation) is field.annotation:
        head = f"{key.path}: section"
    elif field.is_required():
        head = f"{key.path}: {type_name(field.annotation)} (required){_range(field)}"
    else:
        default = _value(field.get_default(call_default_factory=True))
        head = f"{key.path}: {type_name(field.annotation)} = {default}{_range(field)}"
    text = field.description or (inspect.cleandoc(key.section.__doc__ or "") if key.section else "")
    body = textwrap.fill(" ".join(text.replace("``", "").split()), WIDTH, initial_indent="    ",
                         subsequent_indent="    ")
    return head + ("\n" + body if body else "")


def explain(key: str | None = None) -> str:
    """The text ``bigtrain config --explain [KEY]`` prints; no key: every key."""
    found = find(key) if key else list(keys())
    return "\n".join(describe(k) for k in found)
