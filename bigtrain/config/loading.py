"""From YAML files and ``KEY=VALUE`` overrides to a validated :class:`RunConfig`.

Includes (``defaults:``) merge first, in order; the file's own keys win; overrides apply last.
Every problem is a :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bigtrain.config.base import ConfigError
from bigtrain.config.run import RunConfig


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``override`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config, merging the files listed under ``defaults:`` first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    data = _read_yaml(path)
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML file paths")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_tree(path.parent / inc, _seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if not loc or loc in msg else f"{loc}: {msg}"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown config key"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg[0].lower()}{msg[1:]}{got_text}"


def validate(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(_format_error(err) + extra) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load, merge includes, apply overrides and validate. Raises ConfigError with a one-line message.

    ``run.name`` defaults to the config file's stem when no file in the include chain sets it.
    """
    tree = load_yaml_tree(path)
    tree.setdefault("run", {})
    if isinstance(tree["run"], dict):
        tree["run"].setdefault("name", Path(path).stem)
    tree = apply_overrides(tree, overrides or [])
    _download_only_recipe_path(tree, overrides or [])
    return validate(tree)


def _download_only_recipe_path(tree: dict[str, Any], overrides: list[str]) -> None:
    """``data.download`` fills the recipe's own ``data.path``, never a path given on the command
    line (unless the download is asked for there too): a mistyped path must be an error, not a
    fresh download under that name."""
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    data = tree.get("data")
    if isinstance(data, dict) and "data.path" in keys and "data.download" not in keys:
        data["download"] = None
