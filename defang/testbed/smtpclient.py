"""A minimal SMTP client for driving the test bed: one transaction per connection.

Why not `smtplib`: it raises on every 4xx/5xx (tests want to *look* at rejections per
recipient), rewrites line endings with its own rules, and does not set TCP_NODELAY, so
Nagle plus delayed ACK adds ~40 ms per message when headers and body go out in separate
writes -- that would dominate any benchmark.

Line endings and dot-stuffing: SMTP transfers a message as CRLF-terminated lines.  The
corpus holds LF-only, mixed and bare-CR files, which must not go on the wire as-is
(Postfix would guess).  `send` therefore transmits ``normalize_for_smtp(data)``: every
CRLF, bare CR and bare LF becomes CRLF, and a final CRLF is added if the data does not
end with a line break.  That is the exact message a server stores; compare what
arrived with `normalize_for_smtp` of what was sent.  On the wire each line starting with
"." additionally gets a second "." (RFC 5321 4.5.2 transparency), which the server
removes again -- it is transport encoding, not part of the message.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

Reply = tuple[int, str]

_LINE_END = re.compile(rb"\r\n|\r|\n")
# Postfix: "2.0.0 Ok: queued as 4Ab12"; Sendmail: "2.0.0 6B7B1Rfr007096 Message accepted for delivery"
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)|^2\.0\.0 ([0-9A-Za-z]+) Message accepted")


def normalize_for_smtp(data: bytes) -> bytes:
    """The message as an SMTP server will store it when `send` transmits ``data``.

    CRLF, bare CR and bare LF each become CRLF (so "\\r\\r\\n" is two line breaks);
    non-empty data that does not end with a line break gets a final CRLF.  Nothing
    else changes: NUL bytes, 8-bit bytes and long lines pass through untouched.
    """
    out = _LINE_END.sub(b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def dot_stuff(normalized: bytes) -> bytes:
    """RFC 5321 transparency: double a leading "." on every line (input is CRLF-only)."""
    out = normalized.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out


@dataclass
class SendResult:
    """The server's replies to one transaction.

    ``mail`` is the reply to MAIL FROM -- or, if the transaction never got that far,
    the failing greeting/EHLO/HELO reply.  ``rcpts`` maps each recipient that was tried
    to its reply (a 421 stops the loop; later recipients are absent).  ``data`` is the
    reply after the final "." (or the non-354 reply to DATA), None when DATA was not
    sent because no recipient was accepted.  ``queue_id`` comes from Postfix's
    "250 2.0.0 Ok: queued as XXXX" or Sendmail's "250 2.0.0 XXXX Message accepted for
    delivery".
    """

    mail: Reply
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    queue_id: str | None = None
    greeting: Reply | None = None

    @property
    def accepted(self) -> bool:
        """True when the message was accepted after DATA (2xx)."""
        return self.data is not None and 200 <= self.data[0] < 300

    @property
    def accepted_rcpts(self) -> list[str]:
        """Recipients the server accepted at RCPT time."""
        return [r for r, (code, _) in self.rcpts.items() if 200 <= code < 300]


class _Conn:
    """Blocking line-oriented SMTP connection (internal)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def reply(self) -> Reply:
        texts: list[str] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise ConnectionError("connection closed by server while awaiting a reply")
            s = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if len(s) < 3 or not s[:3].isdigit():
                raise ConnectionError(f"malformed SMTP reply line: {s!r}")
            texts.append(s[4:])
            if len(s) == 3 or s[3] != "-":
                return int(s[:3]), "\n".join(texts)

    def command(self, line: str) -> Reply:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


def _stop(reply: Reply) -> bool:
    """421: the server is closing the connection; no further commands."""
    return reply[0] == 421


def send(
    host: str,
    port: int,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    helo: str = "client.test",
    timeout: float = 60,
    mail_options: Sequence[str] = (),
    xclient: str = "",
) -> SendResult:
    """Run one SMTP transaction on a fresh connection and return every reply.

    4xx/5xx replies never raise; they are returned in the `SendResult`.  Connection
    failures (refused, reset, closed mid-reply, timeout) raise `OSError`.  ``data`` is
    sent as ``normalize_for_smtp(data)``, dot-stuffed (see the module docstring).
    ``mail_options`` are appended to MAIL FROM (e.g. "BODY=8BITMIME", "SMTPUTF8").
    ``xclient`` (e.g. "ADDR=81.2.69.160 NAME=[UNAVAILABLE]") is sent as Postfix's XCLIENT
    after EHLO, then EHLO again: the client is taken for that one (by the server and its
    milters; the server's smtpd_authorized_xclient_hosts must list us).
    """
    conn = _Conn(host, port, timeout)
    try:
        greeting = conn.reply()
        if greeting[0] != 220:
            return SendResult(mail=greeting, greeting=greeting)
        ehlo = conn.command(f"EHLO {helo}")
        if 500 <= ehlo[0] < 600 and ehlo[0] != 554:
            ehlo = conn.command(f"HELO {helo}")
        if ehlo[0] != 250:
            return SendResult(mail=ehlo, greeting=greeting)
        if xclient:
            said = conn.command(f"XCLIENT {xclient}")
            if said[0] != 220:
                return SendResult(mail=said, greeting=greeting)
            ehlo = conn.command(f"EHLO {helo}")
            if ehlo[0] != 250:
                return SendResult(mail=ehlo, greeting=greeting)
        opts = "".join(f" {o}" for o in mail_options)
        mail = conn.command(f"MAIL FROM:<{sender}>{opts}")
        result = SendResult(mail=mail, greeting=greeting)
        if mail[0] != 250:
            return result
        for rcpt in recipients:
            reply = conn.command(f"RCPT TO:<{rcpt}>")
            result.rcpts[rcpt] = reply
            if _stop(reply):
                return result
        if not result.accepted_rcpts:
            conn.command("RSET")
            return result
        reply = conn.command("DATA")
        if reply[0] != 354:
            result.data = reply
            return result
        conn.sock.sendall(dot_stuff(normalize_for_smtp(data)) + b".\r\n")
        result.data = conn.reply()
        if m := _QUEUED_AS.search(result.data[1]):
            result.queue_id = m.group(1) or m.group(2)
        if not _stop(result.data):
            try:
                conn.command("QUIT")
            except OSError:
                pass  # the transaction is complete; a lost QUIT reply does not matter
        return result
    finally:
        conn.close()


def send_many(
    host: str,
    port: int,
    messages: Iterable[tuple[str, Sequence[str], bytes]],
    concurrency: int = 10,
    helo: str = "client.test",
    timeout: float = 60,
) -> list[SendResult]:
    """`send` each (sender, recipients, data) on its own connection, ``concurrency`` at a
    time (threads; socket I/O releases the GIL).  Results are in input order; the first
    connection failure is re-raised after all sends have finished.
    """
    items = list(messages)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [
            pool.submit(send, host, port, s, r, d, helo, timeout) for s, r, d in items
        ]
        return [f.result() for f in futures]
