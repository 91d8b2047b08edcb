"""Content-Type, Content-Disposition and Content-Transfer-Encoding, parsed only when read.

Why: under ``policy.default`` every read of a header builds a header object: a new class
(the stdlib's registry makes one per read) and the RFC 5322 parser's token tree.  The feed
parser and the walk read a part's Content-Type a dozen times and its boundary, charset and
filename besides -- yet every one of those readers (``get_content_type``, ``get_param``,
``get_boundary``, ``get_filename``) looks only at the header's *string*.  Only a header's
attributes (``params``, ``content_type``, ``defects``, ``fold``...) need the parse, and a
filter seldom reads them.  The parse was a third of a worker's CPU on the benchmark's
140 KB message (each multipart has a boundary made for it, so ``defang.workers.mime.mailpolicy``'s
tables never hold it), and the parser's code and objects, touched in every worker, were
pages each forked worker copied from the zygote (CPython 3.11 writes reference counts).

How: a value in the plain form below gets a header object whose string is the one the
stdlib would give, built here without the parser; the stdlib parses the raw value (into
the same object, with its own code) the first time an attribute is read.  Plain means:
printable ASCII, a type (``type/subtype`` for Content-Type) and parameters written as
``name=token`` or ``name="text"``, no comments, no encoded words, no ``*``, ``'`` or
``%`` in a parameter's name or unquoted value (RFC 2231's marks, which the stdlib reads
as such), no parameter named twice, no backslash or quote inside a quoted value.  For
such a value the stdlib's string is the raw text up to the first ``;``, then
``' ' + '; '.join(name="value")`` (``name`` alone for an empty value) -- without
parameters, the raw text.  Anything else goes to the stdlib at once, as before.
``tests/unit/test_deferred_headers.py`` holds every corpus value and generated ones to the
stdlib's string and attributes.
"""

from __future__ import annotations

import re
from email.headerregistry import (
    BaseHeader,
    ContentDispositionHeader,
    ContentTransferEncodingHeader,
    ContentTypeHeader,
)
from typing import Any

# RFC 2045 token: printable ASCII but SPACE and ( ) < > @ , ; : \ " / [ ] ? =
_TOKEN = r"[!#-'*+\-.0-9A-Z^-~]+"
# a token without * ' %, which RFC 2231 uses (the stdlib reads them so in any name or value)
_NAME = r"[!#$&+\-.0-9A-Z^-~]+"
_QUOTED_TEXT = r"[ !#-\[\]-~]*"  # inside quotes: no quote, backslash or tab
_PARAM = re.compile(rf";[ \t]*({_NAME})[ \t]*=[ \t]*(?:({_NAME})|\"({_QUOTED_TEXT})\")[ \t]*")
_PARAMS = rf"(?:;[ \t]*{_NAME}[ \t]*=[ \t]*(?:{_NAME}|\"{_QUOTED_TEXT}\")[ \t]*)*"
_PLAIN = {
    "content-type": re.compile(rf"({_TOKEN}/{_TOKEN}[ \t]*)({_PARAMS})"),
    "content-disposition": re.compile(rf"({_TOKEN}[ \t]*)({_PARAMS})"),
    "content-transfer-encoding": re.compile(rf"({_TOKEN}[ \t]*)()"),
}

# the attributes the stdlib's init() sets from the parse (what reading one waits for)
_PARSED = frozenset(
    {"_parse_tree", "_defects", "_params", "_maintype", "_subtype", "_content_disposition", "_cte"}
)


class _Deferred:
    """Mixed in before a stdlib header class: its string now, its parse on first read."""

    def __new__(cls, name: str, value: str, text: str) -> Any:
        self = str.__new__(cls, text)
        self._name = name
        self._raw = value
        return self

    def __getattr__(self, attr: str) -> Any:
        # only reached for attributes not set yet (Python looks here last)
        if attr not in _PARSED or "_parse_tree" in self.__dict__ or "_raw" not in self.__dict__:
            raise AttributeError(attr)
        kwds: dict[str, Any] = {"defects": []}
        type(self).parse(self._raw, kwds)  # type: ignore[attr-defined]
        del kwds["decoded"]  # what str(self) already is
        self.init(self._name, **kwds)  # type: ignore[attr-defined]
        return getattr(self, attr)


_CLASSES = {
    name: type("_" + cls.__name__, (_Deferred, cls, BaseHeader), {})
    for name, cls in (
        ("content-type", ContentTypeHeader),
        ("content-disposition", ContentDispositionHeader),
        ("content-transfer-encoding", ContentTransferEncodingHeader),
    )
}


def deferred_header(name: str, value: str) -> Any:
    """The header object for ``name: value`` with its parse deferred, or None when the
    value is not plain (the caller then has the stdlib parse it)."""
    key = name.lower()
    plain = _PLAIN.get(key)
    if plain is None or "=?" in value:
        return None
    m = plain.fullmatch(value)
    if m is None:
        return None
    head, params = m.groups()
    if not params:
        return _CLASSES[key](name, value, value)
    rendered = []
    seen = set()
    for p in _PARAM.finditer(params):  # they tile ``params``: it matched _PARAMS
        pname, token, quoted = p.groups()
        if pname.lower() in seen:
            return None  # the stdlib drops a repeat, with a defect: leave it to the stdlib
        seen.add(pname.lower())
        text = token if token is not None else quoted
        rendered.append(f'{pname}="{text}"' if text else pname)
    return _CLASSES[key](name, value, f"{head}; {'; '.join(rendered)}")
