"""Typed-schema checks shared by the run spec (TOML) and the federation plan (JSON).

A section or message is a dataclass; its type hints are the schema. `matches` says whether
a parsed value has a field's declared type (no coercion: `enabled = "false"` or a seed of
`3.0` is a mistake, not a value to convert), `describe` names that type for a message, and
`field_problems` checks a whole mapping against a dataclass: unknown keys, missing
required keys and wrong types, each problem named by its dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any


def matches(value: Any, hint: Any) -> bool:
    """Whether a parsed (TOML or JSON) value has the declared type `hint`.

    bool is not an int; an int is a float (if a float can hold it); `Literal[...]` takes its
    values only; `list[X]`, `dict[K, V]` and `Mapping[K, V]` check every item; `Any` and other
    hints accept anything."""
    if hint is Any:  # a class since Python 3.11, but isinstance() refuses it
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool):
            return False
        return isinstance(value, float) or (isinstance(value, int) and abs(value) <= sys.float_info.max)
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is list and args:  # every element, e.g. client_ranks = [2, "4"]
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if origin in (dict, Mapping) and len(args) == 2:
        return isinstance(value, Mapping) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin) if isinstance(origin, type) else True


def describe(hint: Any, *, table: str = "a table") -> str:
    """The type `hint` in words, for "X is not ..." messages (`table`: what a dict is called)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a, table=table) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is list and args:
        return f"a list of {describe(args[0], table=table).removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, Mapping) and len(args) == 2 and args[1] is not Any:
        return f"{table} of {describe(args[1], table=table).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            dict: table, Mapping: table}.get(origin, str(hint))


def show(value: Any, limit: int = 60) -> str:
    """`value` as JSON text for a message, cut to about `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):  # not JSON, or an int past Python's digit limit
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def field_problems(cls: type, data: Any, where: str, *, table: str = "an object") -> list[str]:
    """What is wrong with `data` as the fields of dataclass `cls` (empty when it fits):
    "WHERE: unknown key(s) [...]", "WHERE.KEY: missing", "WHERE.KEY: expected TYPE, got VALUE"."""
    if not isinstance(data, Mapping):
        return [f"{where}: expected {table}, got {show(data)}"]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    found = []
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        found.append(f"{where}: unknown key(s) {[show(k) if not isinstance(k, str) else k for k in unknown]}; "
                     f"valid keys are {sorted(fields)}")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                found.append(f"{where}.{name}: missing")
        elif not matches(data[name], hints[name]):
            found.append(f"{where}.{name}: expected {describe(hints[name], table=table)}, got {show(data[name])}")
    return found
