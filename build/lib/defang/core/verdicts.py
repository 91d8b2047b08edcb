"""What the MTA is told about a stage or a message: ``accept()``, ``reject()``, ``tempfail()``,
``discard()``, or go on (``CONTINUE``).

At the bottom of the layers because every side speaks in verdicts: the filter returns
them, the wire carries them (``defang.core.wire``), the front end turns them into milter
replies, and the daemons make their own from the ``[replies]`` of the config
(``for_reply``).  ``filter.py`` imports the constructors from ``defang``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CODE = re.compile(r"^[245]\d\d$")
_DSN = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

#: every verdict action the wire and the front end know
ACTIONS = frozenset({"continue", "accept", "reject", "tempfail", "discard"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the MTA is told: ``action`` plus the SMTP reply for reject/tempfail."""

    action: str
    code: str | None = None
    dsn: str | None = None
    text: str | None = None


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


def for_reply(code: str, dsn: str, text: str) -> Verdict:
    """The verdict for a configured SMTP reply: a tempfail for a 4xx code, else a reject.

    Not checked again: the config checked code and DSN when it was loaded.
    """
    return Verdict("tempfail" if code.startswith("4") else "reject", code, dsn, text)


CONTINUE = Verdict("continue")
