"""rspamd's HTTP protocol (``POST /checkv2``), sans I/O; h11 writes and reads the HTTP.

The request is the message as the body, and what rspamd would otherwise have to guess
from ``Received:`` lines as headers of the request (rspamd's own protocol): ``IP``,
``Helo``, ``Hostname``, ``From``, one ``Rcpt`` per recipient, ``Queue-Id``, ``User`` (the
SMTP-authenticated user) and ``Deliver-To`` (the user whose settings apply, for
per-recipient preferences).  ``Connection: close``: one request per connection, as the
other checks.  The answer is JSON::

    {"score": 15.2, "required_score": 15.0, "action": "reject", "is_skipped": false,
     "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "options": [...]}, ...}}

(``is_skipped`` is no "not scanned": a pre-result such as GTUBE's sets it, with the
action and score of the verdict.)

A status other than 200, a body that is not that JSON, or an answer cut short is an
``error`` result, never an exception.  h11 (python-hyper's sans-I/O HTTP/1.1) is used
rather than our own HTTP parsing: chunked answers, header folding and framing errors are
its job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import h11

from defang.workers.checks.results import RspamdResult

_UNSAFE = str.maketrans({c: "?" for c in "\r\n\0"})


def _value(text: str) -> bytes:
    return text.translate(_UNSAFE).encode("utf-8", "replace")[:998]


def request(size: int, body: Iterator[bytes], *, ip: str | None, helo: str | None, hostname: str | None,
            sender: str, recipients: Sequence[str], queue_id: str, user: str = "",
            deliver_to: str = "") -> Iterator[bytes]:  # fmt: skip
    """The ``/checkv2`` request for a message of ``size`` bytes whose bytes ``body`` yields."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "rspamd"), ("Content-Length", str(size)), ("Connection", "close")]
    if ip:
        headers.append(("IP", ip))
    if helo:
        headers.append(("Helo", helo))
    if hostname and hostname != "unknown" and not hostname.startswith("["):
        headers.append(("Hostname", hostname))
    headers.append(("From", f"<{sender}>"))
    headers += [("Rcpt", f"<{rcpt}>") for rcpt in recipients]
    if queue_id:
        headers.append(("Queue-Id", queue_id))
    if user:
        headers.append(("User", user))
    if deliver_to:
        headers.append(("Deliver-To", deliver_to))
    yield conn.send(h11.Request(method="POST", target="/checkv2",
                                headers=[(n, _value(v)) for n, v in headers]))  # fmt: skip
    for chunk in body:
        yield conn.send(h11.Data(data=chunk))
    yield conn.send(h11.EndOfMessage())


def parse(answer: bytes, seconds: float = 0.0) -> RspamdResult:
    """rspamd's answer as a result (an ``error`` one if it is not a valid answer)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/checkv2", headers=[("Host", "rspamd"),
                                                                      ("Content-Length", "0")]))  # fmt: skip
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    status, body = 0, bytearray()
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                error = f"rspamd's answer is truncated ({len(answer)} bytes)"
                return RspamdResult(error=error, seconds=seconds)
    except h11.RemoteProtocolError as exc:
        if status:
            return RspamdResult(error=f"rspamd's answer is cut short ({exc})", seconds=seconds)
        shown = answer[:60].decode("ascii", "backslashreplace") or "nothing"
        return RspamdResult(error=f"rspamd answered {shown!r}, not HTTP ({exc})", seconds=seconds)
    if status != 200:
        said = bytes(body[:80]).decode("utf-8", "replace").strip()
        return RspamdResult(error=f"rspamd answered HTTP {status}: {said}", seconds=seconds)
    try:
        data = json.loads(body)
        symbols = {str(name): float(sym.get("score", 0.0)) for name, sym in data.get("symbols", {}).items()}
        return RspamdResult(score=float(data["score"]), required=float(data["required_score"]),
                            action=str(data["action"]), symbols=symbols, seconds=seconds)  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return RspamdResult(error=f"rspamd's answer is not its JSON: {exc}"[:200], seconds=seconds)
