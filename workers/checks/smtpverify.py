"""One recipient probe: would the next hop (the internal server) take this address?

MIMEDefang's ``md_check_against_smtp_server``: connect, EHLO (HELO if refused), ``MAIL
FROM:<sender>``, ``RCPT TO:<address>``, QUIT, and read the RCPT reply: 2xx the address
exists, 5xx the next hop refuses it (unknown), anything else (a 4xx, a refused or
timed-out connection, garbage, a greeting or MAIL FROM refused) is unverified, with why.

The conversation is smtplib's (the stdlib's SMTP client).  Its ``timeout`` holds for each
socket call, so a server that trickles one byte at a time could stretch a probe without
end; here the socket itself carries one deadline for the whole probe (``_DeadlineSocket``):
every send and receive gets only the time left, so a probe never takes longer than
``timeout``, whatever the server does.

The address goes on the wire only when it is one line of an address: no control character
(CR, LF, NUL...), no angle bracket inside, at most 254 octets (RFC 5321's 256-octet path
less the brackets); anything else is ``invalid`` and never sent, so a sender cannot add
SMTP commands of its own to the probe.  A non-ASCII address is sent only to a server that
offers SMTPUTF8 (with that parameter), else it is unverified.  ``smtplib`` is imported when
a probe runs: it imports ``ssl``, which a worker that never probes need not map.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from defang.core.config import VerifySection

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets, "<" and ">" included
MAX_ADDRESS = 254


#: ``[verify]`` as declared in defang.core.config: the server asked (host "" = not configured:
#: every probe is unverified), port, helo ("" = this host's name: gethostname, as getfqdn could
#: wait on DNS), sender (the probe's MAIL FROM; "" = the null sender <>), timeout (the whole
#: probe, connect to RCPT reply), positive_ttl / negative_ttl (how long "exists" / "unknown" is
#: kept; 0 = not kept), on_error (an unverified address: "tempfail" (451 4.4.3) or "accept")
VerifySettings = VerifySection


@dataclass(frozen=True)
class Probe:
    """What the next hop said: ``status`` "exists", "unknown", "unverified" or "invalid"
    (never sent); ``code`` and ``text`` its RCPT reply (0 and "" when there was none);
    ``why`` a line for the log when the status is not the server's RCPT answer."""

    status: str
    code: int = 0
    text: str = ""
    why: str = ""


def bare(address: str) -> str:
    """The address without one pair of enclosing angle brackets (the MTA passes ``<a@b>``)."""
    address = address.strip(" \t")
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def syntax_error(address: str) -> str | None:
    """Why ``address`` (bare) must not go on the wire, or None."""
    if not address:
        return "empty address"
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS:
        return f"longer than {MAX_ADDRESS} octets"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return "control character in the address"
    if "<" in address or ">" in address:
        return "angle bracket inside the address"
    if any("\udc80" <= c <= "\udcff" for c in address):
        return "bytes that are not UTF-8"
    return None


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive may only use the time left until ``deadline``."""

    deadline = 0.0

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out (the probe's deadline)")
        self.settimeout(left)

    def recv_into(self, *args: Any) -> int:  # what smtplib's reader (makefile) calls
        self._left()
        return super().recv_into(*args)

    def recv(self, *args: Any) -> bytes:
        self._left()
        return super().recv(*args)

    def sendall(self, *args: Any) -> None:
        self._left()
        super().sendall(*args)


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address of ``host`` that answers before ``deadline``."""
    last: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock._left()
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last


def _unverified(what: str, code: int, text: bytes | str) -> Probe:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    text = " ".join(text.split())[:300]
    why = f"{what}: {code} {text}" if code > 0 else f"{what}: garbage {text!r}"
    return Probe("unverified", code, text, why)


def probe(address: str, settings: VerifySettings) -> Probe:
    """Ask ``settings.host`` whether it would take ``address``; never raises, never takes
    longer than ``settings.timeout``."""
    address = bare(address)
    bad = syntax_error(address)
    if bad:
        return Probe("invalid", why=bad)
    if not settings.host:
        return Probe("unverified", why="no [verify] host configured")
    import smtplib  # here: see the module docstring

    deadline = time.monotonic() + settings.timeout
    smtp = smtplib.SMTP(local_hostname=settings.helo or socket.gethostname(), timeout=settings.timeout)
    # _get_socket is smtplib's own seam for the socket (SMTP_SSL and LMTP override it)
    smtp._get_socket = lambda host, port, timeout: _connect(host, port, deadline)  # type: ignore[method-assign]
    try:
        code, text = smtp.connect(settings.host, settings.port)
        if code != 220:
            return _unverified("greeting", code, text)
        code, text = smtp.ehlo()
        if not 200 <= code < 300:
            code, text = smtp.helo()
            if not 200 <= code < 300:
                return _unverified("HELO", code, text)
        options = ""
        if not address.isascii():
            if not smtp.has_extn("smtputf8"):
                return Probe("unverified", why="non-ASCII address and the server does not offer SMTPUTF8")
            smtp.command_encoding, options = "utf-8", " SMTPUTF8"
        code, text = smtp.docmd("MAIL", f"FROM:<{settings.sender}>{options}")
        if code != 250:
            return _unverified("MAIL FROM", code, text)
        code, text = smtp.docmd("RCPT", f"TO:<{address}>")
        reply = " ".join(text.decode("utf-8", "replace").split())[:300]
        if 200 <= code < 300:
            return Probe("exists", code, reply)
        if 500 <= code < 600:
            return Probe("unknown", code, reply)
        return _unverified("RCPT TO", code, text)
    except (OSError, smtplib.SMTPException, UnicodeError, ValueError) as exc:
        return Probe("unverified", why=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        try:
            if smtp.sock is not None and time.monotonic() < deadline:
                smtp.send("QUIT\r\n")  # no wait for its reply: the answer is known
        except (OSError, smtplib.SMTPException):
            pass
        smtp.close()
