"""The typed-config engine: dataclass sections built from plain YAML data, with every problem
(unknown key with a did-you-mean, value outside a choice list, wrong type) collected as one
readable line naming the key. Pure Python: a bad config fails before torch is imported.

Each package owns its sections (`models/spec.py`, ...); `config.py` composes them into the
experiment config (docs/architecture.md, "Configuration").
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

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


# --------------------------------------------------------------------------------------------
# The YAML front door: `base:` inheritance and dotted overrides
# --------------------------------------------------------------------------------------------
FRONT_DOOR = """\
CONFIG.yaml   an experiment YAML (yamls/); a top-level `base: other.yaml` (relative to it) is read
              first and this file's sections are merged over it
key.path=value  overrides, applied in order after the YAML; the value is parsed as YAML:
              trainer.max_duration=100ba  model.head.placement=hybrid  eval.cfg_scales=[1.5,2.9]
              eval.reference_stats=null; an unknown key is an error with the closest valid names
`python -m dip_scale.config CONFIG.yaml [key.path=value ...]` prints the resolved config."""


def read_yaml(path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse a YAML mapping; a top-level `base: other.yaml` (relative to this file) is read first
    and this file's keys are merged over it (mappings merge deeply, other values replace)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (base of {_chain[-1]})" if _chain else ""))
    if os.path.abspath(path) in _chain:
        raise ConfigError(f"{path}: `base` chain loops: {' -> '.join(_chain + (os.path.abspath(path),))}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of another YAML file, got {base!r}")
    parent = read_yaml(os.path.join(os.path.dirname(path), base), _chain + (os.path.abspath(path),))
    return deep_merge(parent, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. model.head.placement=hybrid)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value
