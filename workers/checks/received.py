"""The hop spamd never sees: a ``Return-Path:`` and a ``Received:`` line for the hop being
received, written as Postfix writes its own, put before the message spamd is given.

Behind Postfix (or Sendmail) a milter gets the message without the MTA's own
``Received:`` for this hop: it is added after the milters have run.  Without it
SpamAssassin sees no relay at all (``NO_RECEIVED``, ``NO_RELAYS``): its client DNSBL, SPF,
HELO and relay rules have nothing to look at, and the first ``Received:`` it does find is
one the sender wrote.  A sender who writes ``Received: from localhost [127.0.0.1]`` is then
taken for a trusted local relay (``ALL_TRUSTED``).  MIMEDefang (``synthesize_received_header``)
and spamass-milter prepend such a line; so does defang.

Everything from the client (HELO, its host name) is made safe first: only printable ASCII,
no space, no parenthesis (a HELO cannot close the comment and write an address of its
choosing into it), at most 255 characters.  The header is only given to spamd; the
message that leaves is not changed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import formatdate

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()]")


def _safe(text: str) -> str:
    return _UNSAFE.sub("?", text)[:255]


def hop_headers(*, ip: str | None, hostname: str | None, helo: str | None, by: str, queue_id: str,
                sender: str, recipients: Sequence[str], tls: bool = False, auth: bool = False,
                when: float | None = None) -> bytes:  # fmt: skip
    """``Return-Path:`` and ``Received:`` (CRLF line ends) for the hop from the client to us.

    Postfix's form: ``from HELO (NAME [ADDR])``, ``by HOST ... with ESMTP id QUEUEID``
    (``ESMTPS`` under TLS, ``ESMTPA`` authenticated, ``ESMTPSA`` both), ``for <RCPT>`` when
    there is one recipient, then the date.  A client without a verified name is
    ``unknown``; an IPv6 address is written ``IPv6:...``, as Postfix does.  After HOST,
    MIMEDefang's ``(envelope-sender <SENDER>)``: SpamAssassin takes the envelope sender
    (for SPF, HEADER_FROM_DIFFERENT_DOMAINS) from the last untrusted relay's line, and
    distrusts ``Return-Path:`` when the message has one of its own below a ``Received:``.
    """
    addr = ip or "127.0.0.1"
    literal = f"IPv6:{addr}" if ":" in addr else addr
    verified = hostname and hostname != "unknown" and not hostname.startswith("[")
    name = _safe(hostname) if verified else "unknown"
    greeting = _safe(helo) if helo else name
    protocol = "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
    host, qid, envelope = _safe(by) or "localhost", _safe(queue_id) or "unknown", _safe(sender)
    lines = [f"Return-Path: <{envelope}>",
             f"Received: from {greeting} ({name} [{literal}])",
             f"\tby {host} (envelope-sender <{envelope}>) (defang) with {protocol} id {qid}"]  # fmt: skip
    date = formatdate(time.time() if when is None else when, localtime=True)
    if len(recipients) == 1:
        lines.append(f"\tfor <{_safe(recipients[0])}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
