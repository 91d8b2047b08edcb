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

Why the encoder and decoder of each class are generated source (as ``dataclasses``
makes ``__init__``): every message between defang's processes goes through here, several
times per mail.  A loop over the fields calling a check per field cost 17 us to decode an
end-of-message request (JSON itself: 6 us) and showed in the daemons' CPU per message;
the generated code tests the plain types inline and calls a function only for the rest.
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
    if type(value) is list:
        for v in value:  # a loop: all() and a generator cost twice as much on short lists
            if type(v) is not str:
                break
        else:
            return value
    raise TypeError("is not a list of strings")


def text_map(value: Any) -> dict[str, str]:
    if type(value) is dict:
        for v in value.values():
            if type(v) is not str:
                break
        else:
            return value
    raise TypeError("is not a table of strings")


#: annotations tested inline in the generated decoders: annotation -> (types, None allowed)
INLINE: dict[str, tuple[tuple[str, ...], bool]] = {
    "str": (("str",), False),
    "str | None": (("str",), True),
    "str | int": (("str", "int"), False),
    "int": (("int",), False),
    "int | None": (("int",), True),
    "bool": (("bool",), False),
    "float": (("int", "float"), False),
    "float | None": (("int", "float"), True),
    "dict[str, int]": (("dict",), False),
    "dict[str, Any]": (("dict",), False),
    "dict[str, Any] | None": (("dict",), True),
}
#: the annotations every codec knows besides those: annotation -> (check, conversion)
BASIC: dict[str, tuple[Check, Convert]] = {
    "list[str]": (strs, None),
    "list[str] | None": (optional(strs), None),
    "dict[str, str]": (text_map, None),
}


class FieldCodec:
    """Codes dataclasses by their fields' annotations: ``INLINE``, ``BASIC``, ``types``
    (more annotations: name -> (check, conversion to JSON or None)), ``records``
    (dataclasses that appear as fields, alone or as ``list[Name]``) and ``special``
    ((class, field) -> a check of its own)."""

    def __init__(self, *, records: Iterable[type] = (), types: dict[str, tuple[Check, Convert]] | None = None,
                 special: dict[tuple[type, str], Check] | None = None) -> None:  # fmt: skip
        self.types = {**BASIC, **(types or {})}
        self.records = tuple(records)
        for cls in self.records:
            self.types[cls.__name__] = (self._record(cls), self.to_fields)
            self.types[f"list[{cls.__name__}]"] = (self._records(cls), self._to_list)
        self.special = special or {}
        self._decoders: dict[type, Callable[[Any], Any]] = {}
        self._encoders: dict[type, Callable[[Any], dict[str, Any]]] = {}

    def prepare(self, classes: Iterable[type]) -> None:
        """Make the code for ``classes`` and the records now (before a fork: then it is
        shared, not made again, privately, in every process that codes a message)."""
        for cls in {*classes, *self.records}:
            if cls not in self._decoders:
                self._decoders[cls] = self._make_decoder(cls)
                self._encoders[cls] = self._make_encoder(cls)

    def to_fields(self, obj: Any) -> dict[str, Any]:
        encode = self._encoders.get(type(obj))
        if encode is None:
            encode = self._encoders[type(obj)] = self._make_encoder(type(obj))
        return encode(obj)

    def from_fields(self, cls: type, obj: Any) -> Any:
        """An instance of ``cls`` from ``obj``; TypeError or ValueError saying why not."""
        decode = self._decoders.get(cls)
        if decode is None:
            decode = self._decoders[cls] = self._make_decoder(cls)
        return decode(obj)

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

    # --- the generated code

    def _make_decoder(self, cls: type) -> Callable[[Any], Any]:
        env: dict[str, Any] = {"cls": cls, "MISSING": _MISSING}
        lines = ["def decode(obj):",
                 "    if type(obj) is not dict:",
                 "        raise TypeError('is not an object')",
                 "    get = obj.get"]  # fmt: skip
        names = []
        for i, f in enumerate(dataclasses.fields(cls)):
            v = f"v{i}"
            names.append(v)
            lines.append(f"    {v} = get({f.name!r}, MISSING)")
            if f.default is not dataclasses.MISSING:
                env[f"d{i}"] = f.default
                lines.append(f"    if {v} is MISSING: {v} = d{i}")
            elif f.default_factory is not dataclasses.MISSING:
                env[f"d{i}"] = f.default_factory
                lines.append(f"    if {v} is MISSING: {v} = d{i}()")
            else:
                lines.append(f"    if {v} is MISSING: raise TypeError({f'field {f.name!r} is missing'!r})")
            special = self.special.get((cls, f.name))
            inline = None if special else INLINE.get(f.type)  # type: ignore[arg-type]
            if inline is not None:
                types, nullable = inline
                test = " and ".join(f"type({v}) is not {t}" for t in types)
                if nullable:
                    test = f"{v} is not None and {test}"
                is_a = f"field {f.name!r} is a "
                lines.append(f"    elif {test}: raise TypeError({is_a!r} + type({v}).__name__)")
            else:
                env[f"c{i}"] = special or self.types[f.type][0]  # type: ignore[index]
                where = f"field {f.name!r} "
                lines += ["    else:",
                          f"        try: {v} = c{i}({v})",
                          "        except TypeError as e:",
                          f"            raise TypeError({where!r} + str(e)) from None"]  # fmt: skip
        lines.append(f"    return cls({', '.join(names)})")
        return _compile("\n".join(lines), env, "decode")

    def _make_encoder(self, cls: type) -> Callable[[Any], dict[str, Any]]:
        env: dict[str, Any] = {}
        sparse = getattr(cls, "SPARSE", ())
        items, later = [], []
        for i, f in enumerate(dataclasses.fields(cls)):
            convert = None if f.type in INLINE else self.types[f.type][1]  # type: ignore[index]
            value = f"m.{f.name}"
            if convert is not None:
                env[f"e{i}"] = convert
                value = f"e{i}({value})"
            if f.name in sparse:  # left out while it has its default
                has_value = f.default is not dataclasses.MISSING
                env[f"d{i}"] = f.default if has_value else f.default_factory()  # type: ignore[misc]
                later.append(f"    if m.{f.name} != d{i}: out[{f.name!r}] = {value}")
            else:
                items.append(f"{f.name!r}: {value}")
        lines = ["def encode(m):", f"    out = {{{', '.join(items)}}}", *later, "    return out"]
        return _compile("\n".join(lines), env, "encode")


def _compile(source: str, env: dict[str, Any], name: str) -> Callable[..., Any]:
    exec(compile(source, f"<defang.core.codec {name}>", "exec"), env)  # noqa: S102
    return env[name]
