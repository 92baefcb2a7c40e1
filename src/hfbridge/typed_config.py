"""Typed configs from YAML or mappings: dataclass sections checked key by key, every problem reported at once with
its key path, what is allowed, and "did you mean" for unknown keys (``trainer.batch_size: must be >= 1, got 0``).

Shared by the run recipe (:mod:`hfbridge.recipe.config`) and the declarative face's seed-003 config. A field's
``metadata`` may bound it: ``min``, ``exclusive_min``, ``range`` (``[lo, hi)``), ``choices``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid config{f' {source}' if source else ''}"
        super().__init__(head + ":\n  " + "\n  ".join(problems))



def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _unknown_key(path: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"{path}.{key}" if path else key
    return f"{where}: unknown key{hint}; allowed: {', '.join(allowed)}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_bounds(value, meta: dict, path: str, errors: list[str]) -> None:
    if "min" in meta and value < meta["min"]:
        errors.append(f"{path}: must be >= {meta['min']}, got {value!r}")
    if "exclusive_min" in meta and value <= meta["exclusive_min"]:
        errors.append(f"{path}: must be > {meta['exclusive_min']}, got {value!r}")
    if "range" in meta:
        lo, hi = meta["range"]
        if not lo <= value < hi:
            errors.append(f"{path}: must be in [{lo}, {hi}), got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        errors.append(f"{path}: must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")


INVALID = object()


def _check_value(value, annotation, path: str, errors: list[str], meta: dict | None = None):
    """``value`` checked (and lightly coerced) against a type annotation; ``INVALID`` after an error."""
    meta = meta or {}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        options = [o for o in options if o is not type(None)]
        trial: list[str] = []
        for option in options:
            attempt: list[str] = []
            result = _check_value(value, option, path, attempt, meta)
            if not attempt:
                return result
            trial.extend(attempt)
        errors.append(trial[0] if len(options) == 1 else
                      f"{path}: must be {' or '.join(_describe(o) for o in options)}, got {_type_name(value)} {value!r}")
        return INVALID
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
            errors.append(f"{path}: must be one of {', '.join(map(str, choices))}, got {value!r}")
            return INVALID
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list, got {_type_name(value)}")
            return INVALID
        (item_type,) = typing.get_args(annotation) or (Any,)
        items = [_check_value(v, item_type, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return INVALID if any(i is INVALID for i in items) else items
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, path, errors)
    if annotation is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a mapping, got {_type_name(value)}")
            return INVALID
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: must be true or false, got {value!r}")
            return INVALID
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: must be an integer, got {_type_name(value)} {value!r}")
            return INVALID
        _check_bounds(value, meta, path, errors)
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: must be a number, got {_type_name(value)} {value!r}")
            return INVALID
        if not math.isfinite(value):
            errors.append(f"{path}: must be a finite number, got {value!r}")
            return INVALID
        _check_bounds(float(value), meta, path, errors)
        return float(value)
    if annotation is str:
        if not isinstance(value, str) or (not value and "allow_empty" not in meta):
            errors.append(f"{path}: must be a non-empty string, got {_type_name(value)} {value!r}")
            return INVALID
        _check_bounds(value, {k: v for k, v in meta.items() if k == "choices"}, path, errors)
        return value
    return value


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is list:
        return "a list"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def build_section(cls, data, path: str, errors: list[str]):
    """Build dataclass ``cls`` from a mapping, reporting unknown keys, missing keys and bad values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: must be a mapping, got {_type_name(data)}")
        return INVALID
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            errors.append(_unknown_key(path, str(key), allowed))
    kwargs, missing = {}, []
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = _check_value(data[f.name], hints[f.name], _join(path, f.name), errors, dict(f.metadata))
            if value is not INVALID:
                kwargs[f.name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(None)  # already reported
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{_join(path, f.name)}: required key is missing")
            missing.append(f.name)
    if missing:
        return INVALID
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping (``{}`` for an empty file); a clear error for a missing file, bad YAML, or
    a top level that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text: {e}"], str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config: must be a mapping of sections, got {_type_name(data)}"], str(path))
    return data


def write_yaml(data: dict, path: str | Path) -> Path:
    """Write ``data`` as YAML, keys in their order."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None), encoding="utf-8")
    return path
