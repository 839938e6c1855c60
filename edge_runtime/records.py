"""Typed JSON records: build a frozen dataclass from parsed JSON, checking every field's type, nested records too."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from edge_runtime.errors import OffsiteError

R = TypeVar("R")
MAX_DEPTH = 32  # nesting of a JSON document; the project's deepest record (a manifest) has 6 levels


class RecordError(OffsiteError):
    """A JSON record lacks a field, holds a value of the wrong type, or breaks one of its record's rules."""


def _is_record(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """`value` as `annotation` (records built from dicts, containers converted item by item), or RecordError."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _convert(value, option, where)
                except RecordError:
                    continue
        raise RecordError(f"{where} = {_shown(value)} is not {_name(annotation)}")
    if annotation is Any:
        return value
    if _is_record(annotation):
        if not isinstance(value, dict):
            raise RecordError(f"{where} = {_shown(value)} is not a {annotation.__name__} record (a JSON object)")
        return from_dict(annotation, value, where)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise RecordError(f"{where} = {_shown(value)} is not a list")
        (item, *_) = typing.get_args(annotation)
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise RecordError(f"{where} = {_shown(value)} is not an object with string keys")
        _, item = typing.get_args(annotation)
        return {key: _convert(v, item, f"{where}.{key}") for key, v in value.items()}
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if isinstance(value, int) else value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool) and isinstance(value, annotation):
        return value
    if annotation is type(None) and value is None:
        return None
    raise RecordError(f"{where} = {_shown(value)} is not {_name(annotation)}")


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_dict(cls: type[R], data: dict[str, Any], where: str | None = None) -> R:
    """An instance of the dataclass `cls` from `data`; unknown keys are ignored, a missing or mistyped field raises.

    Errors name the field by its dotted path under `where` (default: the class name), e.g.
    `manifest.adapter.kind`. The class's own `__post_init__` checks run too; a ValueError there becomes a
    RecordError under the same name.
    """
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not spec.init:
            continue
        if spec.name in data:
            values[spec.name] = _convert(data[spec.name], hints[spec.name], f"{where}.{spec.name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where} lacks its {spec.name!r} field")
    try:
        return cls(**values)
    except ValueError as error:
        raise RecordError(f"{where}: {error}") from None


def to_dict(record: Any) -> dict[str, Any]:
    """A record as plain JSON-ready values (tuples as lists), the inverse of `from_dict`."""

    def plain(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {key: plain(v) for key, v in value.items()}
        return value

    return plain(dataclasses.asdict(record))


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def json_object(text: bytes | str, where: str) -> dict[str, Any]:
    """`text` parsed as one JSON object at most MAX_DEPTH deep, or RecordError saying what `where` holds instead."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{where} is not JSON ({error})") from None
    except RecursionError:  # the parser's own guard, thousands of levels down
        raise RecordError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where} is a JSON {type(data).__name__}, not an object")
    if _depth(data) > MAX_DEPTH:
        raise RecordError(f"{where} nests deeper than {MAX_DEPTH} levels")
    return data
