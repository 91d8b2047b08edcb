"""The SPAMC/SPAMD protocol (spamd's own, version 1.5), sans I/O.

A request is one line, headers, a blank line and the message::

    REPORT SPAMC/1.5\\r\\nContent-length: 2048\\r\\nUser: filter\\r\\n\\r\\n<message>

and the answer, after which spamd closes the connection::

    SPAMD/1.1 0 EX_OK\\r\\nContent-length: 829\\r\\nSpam: True ; 1000.0 / 5.0\\r\\n\\r\\n<report>

``REPORT`` gives the score in one request and, in its body, the table of the rules that
hit with their points (SpamAssassin's default report template); ``parse`` reads both.
A non-zero code (``SPAMD/1.0 76 Bad header line``), a missing ``Spam:`` header or a body
shorter than its ``Content-length`` is an error result, not an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from defang.workers.checks.results import SpamResult

VERSION = "SPAMC/1.5"
_STATUS = re.compile(rb"SPAMD/(\d+\.\d+) (\d+) ?(.*)")
_SPAM = re.compile(r"(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)", re.IGNORECASE)
# one row of the report's table: " 1000 GTUBE   BODY: Generic Test for ..." / "-0.0 NO_RELAYS ..."
_RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z][A-Z0-9_]*)\b", re.MULTILINE)


def request(size: int, body: Iterator[bytes], user: str = "", command: str = "REPORT") -> Iterator[bytes]:
    """The request for a message of ``size`` bytes whose bytes ``body`` yields."""
    head = f"{command} {VERSION}\r\nContent-length: {size}\r\n"
    if user:
        head += f"User: {user}\r\n"
    yield (head + "\r\n").encode("ascii")
    yield from body


def parse(answer: bytes, seconds: float = 0.0) -> SpamResult:
    """spamd's answer as a result (an ``error`` one if it is not a valid answer)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = _STATUS.fullmatch(lines[0]) if lines and lines[0] else None
    if status is None:
        shown = answer[:60].decode("ascii", "backslashreplace") or "nothing"
        return SpamResult(error=f"spamd answered {shown!r}, not SPAMD/1.x", seconds=seconds)
    if status.group(2) != b"0":
        said = status.group(3).decode("ascii", "replace").strip()
        return SpamResult(error=f"spamd answered {status.group(2).decode()} {said}", seconds=seconds)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    spam = _SPAM.fullmatch(headers.get("spam", ""))
    if not sep or spam is None:
        return SpamResult(error="spamd's answer has no Spam: header (truncated?)", seconds=seconds)
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or len(body) < int(length)):
        error = f"spamd's answer is truncated ({len(body)} of {length} bytes)"
        return SpamResult(error=error, seconds=seconds)
    report = body.decode("utf-8", "replace")
    rules = {name: float(points) for points, name in _RULE.findall(_table(report))}
    return SpamResult(score=float(spam.group(2)), required=float(spam.group(3)),
                      is_spam=spam.group(1).lower() in ("true", "yes"), rules=rules, report=report,
                      seconds=seconds)  # fmt: skip


def _table(report: str) -> str:
    """The rules table of the default report: after the ``pts rule name`` header line."""
    marker = report.find("pts rule name")
    if marker < 0:
        return ""
    start = report.find("\n", report.find("\n", marker) + 1)  # past the header and its ---- line
    return report[start:] if start >= 0 else ""
