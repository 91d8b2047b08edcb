"""How an option is declared: once, as a field of its section's frozen dataclass.

Like gunicorn's ``Setting``, one declaration drives everything else: the field's default is
the option's, its metadata carries the converter of the TOML value (and the key or flat
name when they differ from the field's), ``defang.core.config`` makes the flat ``Config``
and the ``(section, key)`` table from the sections, and an engine takes its section as-is
(``cfg.section(MimeSection)``).  ``@options("mime", "mime_")`` declares ``[mime]``;
the declarations themselves are in ``defang.core.config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any, conv: Callable[[Any], Any], *, flat: str = "", key: str = "") -> Any:
    """One option: its default and the converter of its TOML value (in the field's metadata);
    ``key`` when the TOML key is not the field's name, ``flat`` when its ``Config`` name is
    not the section's prefix and the key."""
    return field(default=default, metadata={"conv": conv, "flat": flat, "key": key})


#: the sections, in the order of etc/defang.toml (``options`` adds each)
SECTIONS: list[type] = []


def options(name: str, prefix: str = "") -> Callable[[type[T]], type[T]]:
    """A frozen dataclass of the options of ``[name]``; each is ``Config.<prefix><key>``
    in the flat ``Config`` (unless its ``opt`` names another)."""

    def declare(cls: type[T]) -> type[T]:
        cls = dataclass(frozen=True)(cls)
        keys = {f.name: f.metadata["key"] or f.name for f in fields(cls)}  # type: ignore[arg-type]
        cls.SECTION, cls.KEYS = name, keys  # type: ignore[attr-defined]
        cls.FLAT = {f.name: f.metadata["flat"] or prefix + keys[f.name] for f in fields(cls)}  # type: ignore
        SECTIONS.append(cls)
        return cls

    return declare


def flat_view(name: str, *sections: type, module: str, extra: tuple[Any, ...] = (),
              namespace: dict[str, Any] | None = None) -> type:
    """A frozen dataclass with the options of ``sections`` as fields under their flat
    names (``mime_max_parts``), same types, defaults and metadata: ``Config`` is the
    view of every section, and an engine that reads several sections may have its own."""
    specs = [(s.FLAT[f.name], f.type, field(default=f.default, metadata={**f.metadata, "section": s.SECTION,
                                                                         "key": s.KEYS[f.name]}))
             for s in sections for f in fields(s)]  # fmt: skip
    view = make_dataclass(name, [*specs, *extra], frozen=True, namespace=namespace)
    view.__module__ = module  # pickled by name, like a class written out
    view.FLAT = {flat: flat for flat, _, _ in specs}  # type: ignore[attr-defined]  # cfg.section(view)
    return view


def section_of(self: Any, cls: type[T]) -> T:
    """``cfg.section(cls)``: the section ``cls`` (``MimeSection``, or a ``flat_view``) of a
    config, as its engine takes it."""
    return cls(**{name: getattr(self, flat) for name, flat in cls.FLAT.items()})  # type: ignore[attr-defined]
