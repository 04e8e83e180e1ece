"""The typed-config engine: dataclass sections built from plain YAML data, with every problem
(unknown key with a did-you-mean, value outside a choice list, wrong type) collected as one
readable line naming the key. Pure Python: a bad config fails before torch is imported.

Each package owns its sections (`models/spec.py`, ...); `config.py` composes them into the
experiment config (docs/architecture.md, "Configuration").
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_TIME_RE = re.compile(r"^\d+(\.\d+)?(ep|ba|sp|tok|dur)$")


class ConfigError(ValueError):
    """A problem with the experiment config, worded for the person who wrote the YAML."""


def build_section(cls, raw: dict[str, Any], prefix: str = ""):
    """Build and type-check one section on its own (e.g. the ModelConfig stored in a model file)."""
    errors: list[str] = []
    obj = build(cls, raw, prefix, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return obj


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def not_a_choice(key: str, value: Any, choices) -> str:
    return f"{key}: {value!r} is not a valid choice; valid choices: {', '.join(map(str, choices))}{suggest(value, choices)}"


def time_string_problem(key: str, value: str, *, positive: bool = True) -> str | None:
    """A Composer time string ('600ep', '1000ba', '0.1dur'), > 0 unless `positive` is False."""
    m = _TIME_RE.match(value)
    if not m:
        return f"{key}: {value!r} is not a Composer time string (e.g. '600ep', '1000ba', '0.1dur')"
    if positive and float(value[: m.start(2)]) <= 0:
        return f"{key}: {value!r} must be greater than zero (e.g. '10ep', '1000ba')"
    return None


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def build(cls, raw: Any, prefix: str, errors: list[str]):
    """`cls(**raw)` with every field coerced and checked; problems are appended to `errors`."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '<top level>'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            errors.append(f"unknown key {prefix + str(key)!r}{suggest(key, names)}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], prefix + name, errors)
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str, errors: list[str]):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".", errors)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key, errors)
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        errors.append(not_a_choice(key, value, choices))
        return choices[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a {_type_name(tp)}, got {value!r}")
            return []
        (item_tp,) = get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append(f"{key}: expected a string, got {value!r}")
        return ""
    raise TypeError(f"unsupported config type {tp} at {key}")  # a schema bug, not a user error
