"""Typed stage parameters: a stage's ``@dataclass`` *is* its schema (types, defaults, docs).

``parse_params`` turns a recipe's ``with:`` mapping into that dataclass, rejecting unknown keys
(with the closest known one), wrong types and out-of-range values with a :class:`ParamError`
that names the key, so the recipe layer can point at the line.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ParamError(ValueError):
    """A bad parameter value; ``key`` is the parameter's name (``None``: the whole mapping)."""

    def __init__(self, key: str | None, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


def param(default: Any = dataclasses.MISSING, *, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text shown by ``slimline stages NAME``."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value),
                                 metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_params(cls: type, raw: dict[str, Any]) -> Any:
    """Validate ``raw`` against dataclass ``cls`` and build it (``__post_init__`` may check ranges
    by raising :class:`ParamError`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(fields) or "none"
            raise ParamError(key, f"unknown parameter{hint} (known: {known})")
        values[key] = coerce(value, hints[key], key)
    missing = [name for name, f in fields.items() if name not in values and _required(f)]
    if missing:
        raise ParamError(missing[0], "required parameter is missing")
    try:
        return cls(**values)
    except ParamError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParamError(None, str(exc)) from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only lossless cases (int -> float,
    list -> tuple)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ParamError as exc:
                errors.append(exc.message)
        raise ParamError(key, f"expected {describe_type(annotation)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParamError(key, f"expected one of {', '.join(map(repr, args))}, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(key, f"expected a list ({describe_type(annotation)}), got {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ParamError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"parameter {key!r}: unsupported annotation {annotation!r}")


def describe_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list[{describe_type(args[0]) if args else 'any'}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def describe_params(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) rows for docs and ``slimline stages NAME``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((f.name, describe_type(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def check_range(key: str, value: float | None, low: float, high: float, *,
                high_open: bool = False) -> None:
    """Raise ParamError unless low <= value <= high (or < high when ``high_open``)."""
    if value is None:
        return
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ParamError(key, f"must be in [{low}, {high}{bracket}, got {value}")


def check_regex(key: str, pattern: str | None) -> None:
    """Raise ParamError unless ``pattern`` is None or compiles as a regular expression."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ParamError(key, f"invalid regular expression: {exc}") from None
