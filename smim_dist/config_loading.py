"""YAML into typed dataclasses: strict keys with a nearest-name hint, type checks, ``base:`` chains, dotted overrides.

Generic over the schema, so the schema module (``smim_dist.config``) holds only the run's fields and their checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


def _number_from_text(text: str, annotation: type) -> int | float | None:
    """A number written the way people write them. YAML 1.1 reads ``2e-3``, ``1E-4`` and ``1e5`` as strings (its
    floats need a dot and a signed exponent), so the field's declared type decides; an int field takes only whole
    values (``1_000``, ``1e3``)."""
    try:
        number = float(text)
    except ValueError:
        return None
    if annotation is float:
        return number
    try:
        return int(text)
    except ValueError:
        return int(number) if number.is_integer() else None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are declared, and numbers written as
    text (``2e-3``) where numbers are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if item_types[-1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            return tuple(_coerce(v, item_types[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{where}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if annotation in (int, float) and isinstance(value, str) and _number_from_text(value, annotation) is not None:
        value = _number_from_text(value, annotation)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")


def not_one_of(value: Any, choices: Sequence[str]) -> str | None:
    """None for one of ``choices``, else what is wrong with a hint at the nearest choice."""
    if value in choices:
        return None
    near = difflib.get_close_matches(str(value), choices, n=1)
    return f"{value!r} is not one of {', '.join(choices)}" + (f"; did you mean {near[0]!r}?" if near else "")


def build(cls: type, values: dict[str, Any], where: str, origin: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: {where or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(where + '.' if where else '') + near[0]}'?" if near else ""
            raise ConfigError(f"{origin}: unknown key '{path}'{hint} (valid here: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value, path, origin)
        else:
            kwargs[key] = _coerce(value, hints[key], f"{origin}: {path}")
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_chain(path: Path, schema: type, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file merged over its ``base:`` files (paths relative to it), each checked against ``schema``."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (named as base by {seen[-1]})" if seen else ""))
    if path in seen:
        raise ConfigError(f"config base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a YAML text file: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(values).__name__}")
    bases = values.pop("base", None)
    bases = [bases] if isinstance(bases, str) else bases or []
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: base: {bases!r} must be a file name or a list of them, "
                          "relative to this file")
    merged: dict = {}
    for base in bases:
        merged = merge(merged, read_chain(path.parent / base, schema, seen + (path,)))
    build(schema, values, "", str(path))
    return merge(merged, values)


def override_tree(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return tree
