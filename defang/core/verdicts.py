"""What the MTA is told about a stage or a message: ``accept()``, ``reject()``, ``tempfail()``,
``discard()``, or go on (``CONTINUE``).

At the bottom of the layers because every side speaks in verdicts: the filter returns
them, the wire carries them (``defang.core.wire``), the front end turns them into milter
replies, and the daemons make their own from the ``[replies]`` of the config
(``for_reply``).  ``filter.py`` imports the constructors from ``defang``.

A refusal made with ``monitor=True`` is not carried out: the message goes on as if it had
not been made, and the refusal is logged and stamped on the message (``X-Defang-Would``);
see docs/filters.md, "Monitor mode".

Reply text is what the sender's MTA shows its user, often copied from the message (a
subject, a file name): a CR or NUL in it would end the SMTP reply early, and an MTA may
refuse a reply line longer than 512 octets.  So instead of failing the filter (which
tempfails the message, and the sender retries for days) the text is cleaned: CR and NUL
become spaces, each line is cut to ``MAX_LINE`` characters and the text to
``MAX_LINES`` lines, and a WARNING says so.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("defang.filter")

_CODE = re.compile(r"^[245]\d\d$")
_DSN = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
MAX_LINE = 400  # characters of reply text per line (SMTP: 512 octets with code and DSN)
MAX_LINES = 32  # libmilter's limit for a multi-line reply

#: every verdict action the wire and the front end know
ACTIONS = frozenset({"continue", "accept", "reject", "tempfail", "discard"})
#: the actions that refuse the message (or the stage): what monitor mode only notes
REFUSALS = frozenset({"reject", "tempfail", "discard"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the MTA is told: ``action`` plus the SMTP reply for reject/tempfail.

    ``monitor``: log and stamp the refusal, do not carry it out.
    """

    #: "continue" (go on), "accept", "reject", "tempfail" or "discard"
    action: str
    #: the SMTP reply code of a reject (5xx) or tempfail (4xx); None otherwise
    code: str | None = None
    #: the enhanced status code (RFC 3463: "5.7.1"); None otherwise
    dsn: str | None = None
    #: the reply text (several lines allowed); None otherwise
    text: str | None = None
    #: a refusal only noted (``X-Defang-Would``), not carried out
    monitor: bool = False

    def __str__(self) -> str:
        """As a log line or a header shows it: ``reject 550 5.7.1 text``."""
        if self.code is None:
            return self.action
        return f"{self.action} {self.code} {self.dsn or ''} {self.text or ''}".rstrip()


def clean_text(text: str) -> str:
    """Reply text that an MTA will take whole: see the module docstring."""
    lines = text.replace("\r\n", "\n").split("\n")
    clean = [line.replace("\r", " ").replace("\0", " ")[:MAX_LINE] for line in lines[:MAX_LINES]]
    out = "\n".join(clean)
    if out != text.replace("\r\n", "\n"):
        log.warning("reply text cleaned (CR or NUL made spaces, cut to %d lines of %d characters): %r",
                    MAX_LINES, MAX_LINE, text[:200])  # fmt: skip
    return out


def _reply(kind: str, first: str, text: str, code: str, dsn: str, monitor: bool) -> Verdict:
    code, dsn = str(code), str(dsn)
    if not _CODE.match(code) or code[0] != first:
        raise ValueError(f"{kind}: SMTP code must be {first}xx, got {code!r}")
    if not _DSN.match(dsn) or dsn[0] != first:
        raise ValueError(f"{kind}: DSN code must be {first}.x.y, got {dsn!r}")
    if not isinstance(text, str):
        raise TypeError(f"{kind}: reply text must be a str, not {type(text).__name__}")
    if "\r" in text or "\0" in text or len(text) > MAX_LINE:
        text = clean_text(text)
    return Verdict(kind, code, dsn, text, bool(monitor))


def accept() -> Verdict:
    """Accept: no further filtering of this message (or connection, in filter_relay)."""
    return Verdict("accept")


def reject(text: str = "Message rejected", code: str = "550", dsn: str = "5.7.1", *,
           monitor: bool = False) -> Verdict:  # fmt: skip
    """Permanent failure.  ``text`` may hold several lines (separated by newlines)."""
    return _reply("reject", "5", text, code, dsn, monitor)


def tempfail(text: str = "Try again later", code: str = "451", dsn: str = "4.7.1", *,
             monitor: bool = False) -> Verdict:  # fmt: skip
    """Temporary failure: the sending MTA keeps the message and retries."""
    return _reply("tempfail", "4", text, code, dsn, monitor)


def discard(*, monitor: bool = False) -> Verdict:
    """Accept the message and silently throw it away."""
    return Verdict("discard", monitor=bool(monitor))


def for_reply(code: str, dsn: str, text: str) -> Verdict:
    """The verdict for a configured SMTP reply: a tempfail for a 4xx code, else a reject.

    Not checked again: the config checked code and DSN when it was loaded.
    """
    return Verdict("tempfail" if code.startswith("4") else "reject", code, dsn, text)


CONTINUE = Verdict("continue")
