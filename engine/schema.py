"""Typed dataclass schemas: a dataclass built from YAML-loaded data, every problem collected.

:func:`build` checks each key against the dataclass's fields (an unknown key gets the closest valid
name) and each value against the field's type (int, float, str, bool, dict, list, Literal, unions
with None, nested dataclasses), reading '1e-4' as a float (PyYAML reads it as a string); a field
declared with ``metadata=check(fn)`` is also checked by ``fn`` (the validators below). A dataclass
may name ``RETIRED_KEYS: ClassVar[dict[str, str]]``, keys that left it: a null value still loads (as
the files written before hold), any other is refused with the line given. ``--set key.path=value``
overrides are read as YAML (:func:`parse_overrides`) and set into the data (:func:`set_path`) before
it is built. engine.config's run config and the methods' settings are built with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def probability(v):
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def at_most(limit: int, why: str):
    """Positive and at most ``limit``: beyond it a run cannot work (it would exhaust memory or processes)."""
    def checker(v):
        return "must be > 0" if v <= 0 else f"must be at most {limit:,} ({why})" if v > limit else None
    return checker


def check(fn):
    """A field's metadata: ``fn(value)`` returns None, or what is wrong (after the type check passed)."""
    return {"check": fn}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


_MISSING = object()


def _coerce(value: Any, tp) -> Any:
    """``value`` as type ``tp``, or _MISSING. Accepts '1e-4' for floats (PyYAML reads it as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            out = _coerce(value, a)
            if out is not _MISSING:
                return out
        return _MISSING
    if origin is Literal:
        return value if value in typing.get_args(tp) else _MISSING
    if tp is Any:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _MISSING
    if tp is float:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    if tp is dict:
        return dict(value) if isinstance(value, dict) else _MISSING
    if tp is list:
        return list(value) if isinstance(value, (list, tuple)) else _MISSING
    return _MISSING


def build(cls, data: Any, prefix: str, problems: list[str]):
    """``cls`` built from ``data`` (a mapping, or None for the defaults), its nested dataclasses too;
    each problem is appended to ``problems`` (prefixed ``prefix.key``) and that key left at its default."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED_KEYS", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
        return cls()
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields and key in retired:
            if value is not None:
                problems.append(f"{path}: {retired[key]}")
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"{path}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, path, problems)
            continue
        out = _coerce(value, tp)
        if out is _MISSING:
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            continue
        checker = fields[key].metadata.get("check")
        if checker is not None and out is not None:
            msg = checker(out)
            if msg:
                problems.append(f"{path}: {msg}, got {out!r}")
                continue
        kwargs[key] = out
    return cls(**kwargs)


def set_path(data: dict, dotted: str, value: Any, problems: list[str]) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` ``a.b.c``, creating the sections on the way."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            problems.append(f"--set {dotted}: {k} is not a section")
            return
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None, problems: list[str]) -> list[tuple[str, Any]]:
    """``--set key.path=value`` items as (key path, value): the value read as YAML, else as the string."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item}: expected key.path=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out
