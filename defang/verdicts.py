"""The verdicts a filter returns: ``accept()``, ``reject()``, ``tempfail()``, ``discard()``.

They live in the daemon package so that ``from defang import reject`` works in
``filter.py`` and so both sides agree on one definition of what a verdict is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_CODE = re.compile(r"^[245]\d\d$")
_DSN = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the MTA is told: ``action`` plus the SMTP reply for reject/tempfail."""

    action: str
    code: str | None = None
    dsn: str | None = None
    text: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"action": self.action, "code": self.code, "dsn": self.dsn, "text": self.text}


def _reply(kind: str, first: str, text: str, code: str, dsn: str) -> Verdict:
    code, dsn = str(code), str(dsn)
    if not _CODE.match(code) or code[0] != first:
        raise ValueError(f"{kind}: SMTP code must be {first}xx, got {code!r}")
    if not _DSN.match(dsn) or dsn[0] != first:
        raise ValueError(f"{kind}: DSN code must be {first}.x.y, got {dsn!r}")
    if "\r" in text or "\0" in text:
        raise ValueError(f"{kind}: reply text may not contain CR or NUL")
    return Verdict(kind, code, dsn, text)


def accept() -> Verdict:
    """Accept: no further filtering of this message (or connection, in filter_relay)."""
    return Verdict("accept")


def reject(text: str = "Message rejected", code: str = "550", dsn: str = "5.7.1") -> Verdict:
    """Permanent failure.  ``text`` may hold several lines (separated by newlines)."""
    return _reply("reject", "5", text, code, dsn)


def tempfail(
    text: str = "Try again later", code: str = "451", dsn: str = "4.7.1"
) -> Verdict:
    """Temporary failure: the sending MTA keeps the message and retries."""
    return _reply("tempfail", "4", text, code, dsn)


def discard() -> Verdict:
    """Accept the message and silently throw it away."""
    return Verdict("discard")


CONTINUE = Verdict("continue")
