"""Dataclasses to JSON objects and back, checked field by field: the machinery of the wire.

``defang.core.wire`` declares its messages as dataclasses; a ``FieldCodec`` turns one
into a dict of its fields (``to_fields``) and builds one from a dict (``from_fields``),
checking every field by its annotation, as written in the class (``from __future__ import
annotations`` keeps it a string): ``"str"``, ``"list[str]"``, ``"int | None"``...  A check
raises ``TypeError`` saying what is wrong; the wire turns that into a ``ProtocolError``.

Checks are exact (``type(v) is int``): JSON has no other way to send an int, and a bool
is not one.  A field with a default may be missing; a list of strings may be null.
Records (dataclasses inside messages) are coded the same way, recursively.  What a
class leaves out while unset is named in its ``SPARSE`` class attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

Check = Callable[[Any], Any]
Convert = Callable[[Any], Any] | None
_MISSING: Any = object()


def kind(*types: type) -> Check:
    def check(value: Any) -> Any:
        if type(value) not in types:  # exact: a bool is no int here
            raise TypeError(f"is a {type(value).__name__}")
        return value

    return check


def optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def strs(value: Any) -> list[str]:
    if value is None:  # null: none
        return []
    if type(value) is not list or not all(type(v) is str for v in value):
        raise TypeError("is not a list of strings")
    return value


def text_map(value: Any) -> dict[str, str]:
    if type(value) is not dict or not all(type(v) is str for v in value.values()):
        raise TypeError("is not a table of strings")
    return value


#: the annotations every codec knows
BASIC: dict[str, tuple[Check, Convert]] = {
    "str": (kind(str), None),
    "str | None": (optional(kind(str)), None),
    "str | int": (kind(str, int), None),
    "int": (kind(int), None),
    "int | None": (optional(kind(int)), None),
    "bool": (kind(bool), None),
    "float": (kind(int, float), None),
    "float | None": (optional(kind(int, float)), None),
    "list[str]": (strs, None),
    "list[str] | None": (optional(strs), None),
    "dict[str, str]": (text_map, None),
    "dict[str, int]": (kind(dict), None),
    "dict[str, Any]": (kind(dict), None),
    "dict[str, Any] | None": (optional(kind(dict)), None),
}


class FieldCodec:
    """Codes dataclasses by their fields' annotations: ``BASIC``, ``types`` (more
    annotations: name -> (check, conversion to JSON or None)), ``records`` (dataclasses
    that appear as fields, alone or as ``list[Name]``) and ``special`` ((class, field) ->
    a check of its own)."""

    def __init__(self, *, records: Iterable[type] = (), types: dict[str, tuple[Check, Convert]] | None = None,
                 special: dict[tuple[type, str], Check] | None = None) -> None:  # fmt: skip
        self.types = {**BASIC, **(types or {})}
        for cls in records:
            self.types[cls.__name__] = (self._record(cls), self.to_fields)
            self.types[f"list[{cls.__name__}]"] = (self._records(cls), self._to_list)
        self.special = special or {}
        self._fields: dict[type, list[tuple[str, Check, Convert, Any]]] = {}

    def to_fields(self, obj: Any) -> dict[str, Any]:
        sparse = getattr(obj, "SPARSE", ())
        out = {}
        for name, _, convert, default in self._fields_of(type(obj)):
            value = getattr(obj, name)
            if name in sparse and value == default:
                continue
            out[name] = value if convert is None else convert(value)
        return out

    def from_fields(self, cls: type, obj: Any) -> Any:
        """An instance of ``cls`` from ``obj``; TypeError or ValueError saying why not."""
        if type(obj) is not dict:
            raise TypeError("is not an object")
        values = {}
        for name, check, _, default in self._fields_of(cls):
            if name in obj:
                try:
                    values[name] = check(obj[name])
                except TypeError as exc:
                    raise TypeError(f"field {name!r} {exc}") from None
            elif default is _MISSING:
                raise TypeError(f"field {name!r} is missing")
        return cls(**values)

    def _to_list(self, items: list[Any]) -> list[dict[str, Any]]:
        return [self.to_fields(item) for item in items]

    def _record(self, cls: type) -> Check:
        return lambda value: self.from_fields(cls, value)

    def _records(self, cls: type) -> Check:
        def check(value: Any) -> list[Any]:
            if type(value) is not list:
                raise TypeError("is not a list")
            return [self.from_fields(cls, v) for v in value]

        return check

    def _fields_of(self, cls: type) -> list[tuple[str, Check, Convert, Any]]:
        """(name, check, conversion, default or _MISSING) of each field; made once per class."""
        spec = self._fields.get(cls)
        if spec is None:
            spec = []
            for f in dataclasses.fields(cls):
                check, convert = self.types[f.type]  # type: ignore[index]
                check = self.special.get((cls, f.name), check)
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()  # compared against (SPARSE), never handed out
                else:
                    default = _MISSING
                spec.append((f.name, check, convert, default))
            self._fields[cls] = spec
        return spec
