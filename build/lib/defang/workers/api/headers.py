"""The header section of a spooled message, and the checks on what a filter writes into one.

Header text: values are unfolded (the line breaks of folding removed, the whitespace
kept) and stripped of surrounding blanks; bytes are decoded as UTF-8 where valid
(RFC 6532) and byte by byte as Windows-1252 where not, so a value is always printable,
JSON-safe text and a legacy Latin-1 subject stays readable.

The checks (``check_header_name``, ``check_address``...) run when the filter calls an
action, so a bad argument raises in the admin's traceback at the line that made the
call, not later in the front end.
"""

from __future__ import annotations

import re
from typing import Any

from defang.workers.mime.text import lenient_text

_FIELD = re.compile(rb"\n(?![ \t])")  # a line end that does not fold
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ":"
_BAD_IN_VALUE = re.compile(r"\r\n(?![ \t])|\n(?![ \t])|\r(?!\n)|\0")
_HEADER_READ = 16 * 1024

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
    if not isinstance(name, str):
        raise TypeError(f"header name must be a str, not {type(name).__name__}")
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}: use printable ASCII without ':' or spaces")
    return name


def check_header_value(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"header value must be a str, not {type(value).__name__}")
    if ("\r" in value or "\n" in value or "\0" in value) and _BAD_IN_VALUE.search(value):
        raise ValueError(
            f"invalid header value {value[:60]!r}: CR, LF and NUL are allowed only as "
            "folding (a line break followed by a space or tab)"
        )
    return value


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
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"{what} {text[:60]!r} contains CR, LF or NUL")
    return text


def check_args(args: Any) -> str | None:
    return None if args is None else check_text(args, "ESMTP args")


def check_index(index: Any, minimum: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"header index must be an int, not {type(index).__name__}")
    if index < minimum:
        raise ValueError(f"header index must be >= {minimum}, got {index}")
    return index
