"""Suspicious characters in headers: a control character anywhere in a header (NUL,
ESC, a bare CR: nothing a real mail program writes), or raw 8-bit bytes in From, To,
Cc, Reply-To or Subject of a message not sent as SMTPUTF8 (international text there is
sent RFC 2047-encoded; raw bytes are how filters are dodged)."""

import re

from defang import reject

CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
EIGHT_BIT = re.compile(rb"[\x80-\xff]")
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to", "subject"})


def filter_begin(msg):
    utf8 = any(arg.upper() == "SMTPUTF8" for arg in msg.conn.esmtp_args)
    for name, raw in msg.raw_headers:
        bad = CONTROL.search(raw)
        if bad:
            return reject(f"Header {_shown(name)} has a control character (0x{bad[0][0]:02x})",
                          code="554", dsn="5.6.0")  # fmt: skip
        if not utf8 and name.lower() in ADDRESS_HEADERS and EIGHT_BIT.search(raw):
            return reject(f"Header {_shown(name)} has unencoded 8-bit characters", code="554", dsn="5.6.7")
    return None


def _shown(name):
    """The header's name for the reply: a broken header's "name" can be any bytes."""
    shown = re.sub(r"[^\x21-\x7e]", "?", name)
    return shown if len(shown) <= 40 else shown[:37] + "..."
