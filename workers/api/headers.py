"""The header section of a spooled message, and the checks on what a filter writes into one.

Header text: values are unfolded (the line breaks of folding removed, the whitespace
kept) and stripped of surrounding blanks; bytes are decoded as UTF-8 where valid
(RFC 6532) and byte by byte as Windows-1252 where not, so a value is always printable,
JSON-safe text and a legacy Latin-1 subject stays readable.

The checks (``check_header_name``, ``check_address``...) run when the filter calls an
action, so a bad argument raises in the admin's traceback at the line that made the
call, not later in the front end.  A wrong *type* raises (a bug in filter.py); odd
*text* never does, because text is often copied from the message (a decoded subject, a
file name) and an exception would tempfail the message on every retry until it
expires.  So a header value with a bare line break is folded (the break becomes
folding white space: the value reads the same with a space there, RFC 5322 section
2.2.3), a NUL dropped; a header name with characters a field name cannot have gets
``-`` for each; a quarantine or hold reason gets spaces for CR, LF and NUL.  Each
cleaning is one WARNING line.  ESMTP arguments and addresses are not text: those
still raise (an address cannot be guessed from a broken one).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from defang.workers.mime.text import lenient_text

_FIELD = re.compile(rb"\n(?![ \t])")  # a line end that does not fold
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ":"
_BAD_IN_VALUE = re.compile(r"\r\n(?![ \t])|\n(?![ \t])|\r(?!\n)|\0")
_NOT_IN_NAME = re.compile(r"[^!-9;-~]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BREAKS_AND_NUL = re.compile(r"[\r\n\0]+")
_HEADER_READ = 16 * 1024
UNNAMED = "X-Defang-Unnamed"  # the name an empty header name becomes

log = logging.getLogger("defang.filter")


def read_header_section(path: str) -> bytes:
    """The bytes before the first empty line of ``path`` (all of it if none)."""
    with open(path, "rb") as f:
        data = f.read(_HEADER_READ)
        if data[:1] == b"\n" or data[:2] == b"\r\n":
            return b""  # no headers at all
        start = 0
        while True:
            cut = _end_of_headers(data, start)
            if cut >= 0:
                return data[:cut]
            more = f.read(max(_HEADER_READ, len(data)))
            if not more:
                return data
            start = max(0, len(data) - 2)
            data += more


def _end_of_headers(data: bytes, start: int) -> int:
    """Offset of the line end before the first empty line, or -1 (bytes.find: C speed)."""
    crlf = data.find(b"\n\r\n", start)
    lf = data.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(data))
    end = lf if lf >= 0 else crlf
    if end < 0:
        return -1
    return end - 1 if end and data[end - 1 : end] == b"\r" else end


def parse_header_section(block: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """``(name, raw value)`` pairs (folds as CRLF, leading blank removed), and defects."""
    headers: list[tuple[str, bytes]] = []
    defects: list[str] = []
    if not block:
        return headers, defects
    for field in _FIELD.split(block.replace(b"\r\n", b"\n")):
        name, colon, rest = field.partition(b":")
        if not colon or b"\n" in name or not name.strip() or name[:1] in (b" ", b"\t"):
            defects.append(f"not a header field: {lenient_text(field)[:80]!r}")
            continue
        headers.append((name.rstrip(b" \t").decode("latin-1"), rest.lstrip(b" \t").replace(b"\n", b"\r\n")))
    return headers, defects


def unfold(raw: bytes) -> str:
    return lenient_text(raw.replace(b"\r\n", b"")).strip(" \t\r")


# --- argument checks (raise in the filter's own call) -----------------------------


def check_header_name(name: Any) -> str:
    """``name`` as a field name: printable ASCII but ``:`` (RFC 5322 ftext); each other
    character becomes ``-`` (an empty name ``UNNAMED``), with a WARNING."""
    if not isinstance(name, str):
        raise TypeError(f"header name must be a str, not {type(name).__name__}")
    if _FIELD_NAME.fullmatch(name):
        return name
    clean = _NOT_IN_NAME.sub("-", name) or UNNAMED
    log.warning("header name %r is not a field name (printable ASCII without ':' or spaces): used %r",
                name[:80], clean[:80])  # fmt: skip
    return clean


def check_header_value(value: Any) -> str:
    """``value`` as the MTA can take it: folding kept, a bare line break folded, NUL dropped."""
    if not isinstance(value, str):
        raise TypeError(f"header value must be a str, not {type(value).__name__}")
    if ("\r" in value or "\n" in value or "\0" in value) and _BAD_IN_VALUE.search(value):
        return fold_value(value)
    return value


def fold_value(value: str) -> str:
    """Each line break of ``value`` made a fold (CRLF and a space, unless a space or tab
    follows already); lines of white space only dropped (RFC 5322 forbids them in a
    folded field); NUL dropped.  Unfolded, the value reads as before with a space at
    each break.  Logged once, as a WARNING."""
    lines = [line for line in _LINE_BREAK.split(value.replace("\0", "")) if line.strip(" \t")]
    folded = "\r\n".join(line if i == 0 or line[0] in " \t" else " " + line for i, line in enumerate(lines))
    log.warning("header value %r has line breaks that are not folding (or NUL): folded", value[:80])
    return folded


def check_address(addr: Any, *, what: str, allow_empty: bool = False) -> str:
    if not isinstance(addr, str):
        raise TypeError(f"{what} must be a str, not {type(addr).__name__}")
    if not addr and not allow_empty:
        raise ValueError(f"{what} may not be empty")
    if addr.startswith("<") or addr.endswith(">"):
        raise ValueError(f"{what} {addr!r}: pass the address without angle brackets")
    if "\r" in addr or "\n" in addr or "\0" in addr:
        raise ValueError(f"{what} {addr!r} contains CR, LF or NUL")
    return addr


def check_text(text: Any, what: str) -> str:
    """One line of text (a quarantine or hold reason): CR, LF and NUL become spaces."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if "\r" in text or "\n" in text or "\0" in text:
        log.warning("%s %r has CR, LF or NUL: each run made a space", what, text[:80])
        return _BREAKS_AND_NUL.sub(" ", text)
    return text


def check_args(args: Any) -> str | None:
    """ESMTP arguments: not text to clean (a line break in them is an injection)."""
    if args is None:
        return None
    if not isinstance(args, str):
        raise TypeError(f"ESMTP args must be a str, not {type(args).__name__}")
    if "\r" in args or "\n" in args or "\0" in args:
        raise ValueError(f"ESMTP args {args[:60]!r} contain CR, LF or NUL")
    return args


def check_index(index: Any, minimum: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"header index must be an int, not {type(index).__name__}")
    if index < minimum:
        raise ValueError(f"header index must be >= {minimum}, got {index}")
    return index
