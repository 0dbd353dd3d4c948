"""Reading presets: YAML files with inheritance, dotted command-line overrides, and the strict typed conversion of
the raw mapping into the schema's dataclasses (every problem is recorded, none raised here)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# Shipped next to the package in a checkout (presets/ is not installed): the suggested parent of an empty preset.
_BASE_PRESET = Path(__file__).resolve().parents[2] / "presets" / "base.yaml"

# ------------------------------------------------------------------------------------------------------ types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    bad = f"{key}: expected {_type_name(tp)}, got {value!r}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a section (mapping), got {value!r}")
            return tp()
        return _build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(bad)
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(bad)
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return []
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return {}
        _, inner = typing.get_args(tp)
        return {str(k): _convert(v, inner, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the schema, not user input


def _check_range(value: Any, meta: dict, key: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value <= lo)):
        problems.append(f"{key}: {value} is below the minimum ({'>' if meta.get('exclusive_min') else '>='} {lo})")
    if hi is not None and value > hi:
        problems.append(f"{key}: {value} is above the maximum (<= {hi})")


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            problems.append(f"{key}: unknown key{_suggest(str(k), list(fields))}")
            continue
        value = _convert(v, hints[k], key, problems)
        _check_range(value, dict(fields[k].metadata), key, problems)
        kwargs[k] = value
    try:
        return cls(**kwargs)
    except TypeError:  # only reachable with earlier problems recorded
        return cls()


def _suggest(name: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid keys here: {', '.join(options)}"


# ------------------------------------------------------------------------------------------------------- YAML


def _read_yaml(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        problems.append(f"{path}: preset file not found")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problems.append(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}")
        return {}
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return {}
    if data is None:  # an empty file, only comments, or `null`
        problems.append(_empty_preset(path))
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def _empty_preset(path: Path) -> str:
    parent = "base.yaml"
    if _BASE_PRESET.is_file():
        rel = os.path.relpath(_BASE_PRESET, path.parent)
        parent = rel if not rel.startswith(os.path.join("..", "..", "..")) else str(_BASE_PRESET)
    return (f"{path}: the preset is empty; to start from the defaults write `inherit: {parent}` (path relative to "
            "this file) and the keys you change")


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, problems: list[str], _seen: tuple[Path, ...] = ()) -> dict:
    """Read a preset and everything it inherits from (child keys win, mappings merge)."""
    path = Path(path).resolve()
    if path in _seen:
        problems.append(f"{path}: inherit cycle ({' -> '.join(p.name for p in (*_seen, path))})")
        return {}
    data = _read_yaml(path, problems)
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        problems.append(f"{path}: inherit: expected a path to another preset, got {parent!r}")
        return data
    return _merge(load_raw(path.parent / parent, problems, (*_seen, path)), data)


def parse_override(item: str, problems: list[str]) -> tuple[list[str], Any] | None:
    if "=" not in item:
        problems.append(f"override '{item}': expected key=value, e.g. optim.lr=1e-4")
        return None
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _fix_yaml_floats(data: Any) -> Any:
    """YAML 1.1 reads '1e-4' (no dot) as a string; presets mean a number."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and any(c in data.lower() for c in "e."):
        return float(data)
    return data


# -------------------------------------------------------------------------------------------------- overrides


def _child_type(tp: Any, key: str) -> tuple[bool, Any]:
    """Whether `tp` holds named entries (a section or mapping) and, if so, the annotation of entry `key`.

    (True, None): a section without such a field, left to `_build` to report as an unknown key with a suggestion.
    """
    if tp is Any:
        return True, Any
    if dataclasses.is_dataclass(tp):
        return True, typing.get_type_hints(tp).get(key)
    if typing.get_origin(tp) is dict:
        return True, typing.get_args(tp)[1]
    return False, None


def apply_override(raw: dict, keys: list[str], value: Any, schema: type, problems: list[str]) -> None:
    """Set raw[k0][k1]... = value. A path that runs through a single value (by the schema, or a non-mapping already
    in `raw`) is a problem naming the key; a path through an unknown key is left for `_build` to report."""
    dotted = ".".join(keys)

    def single_value(upto: int, tp: Any) -> None:
        where = ".".join(keys[:upto])
        problems.append(f"{dotted}: {where} is a single value ({_type_name(tp)}), not a section; set it directly, "
                        f"e.g. {where}=VALUE")

    tp: Any = schema  # the annotation of the node being descended into (None: unknown key, left to _build)
    node = raw
    for i, k in enumerate(keys[:-1]):
        if tp is not None:
            tp = _child_type(tp, k)[1]
            if tp is not None and not _child_type(tp, keys[i + 1])[0]:
                return single_value(i + 1, tp)
        current = node.setdefault(k, {})
        if not isinstance(current, dict):
            problems.append(f"{dotted}: {'.'.join(keys[: i + 1])} is {current!r}, not a mapping, so it has no key "
                            f"'{keys[i + 1]}'")
            return None
        node = current
    node[keys[-1]] = value
    return None
