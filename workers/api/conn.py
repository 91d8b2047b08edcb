"""The ``conn`` object a filter's hooks receive, and the check that keeps notes JSON.

A worker sees one decision of a connection at a time, and the next decision of the
same connection may go to another worker.  So everything a filter wants to carry from
``filter_relay`` to ``filter_end`` travels in ``conn.notes`` inside the requests and
replies.  That is why notes must survive ``json.dumps`` and stay small: they are sent
back and forth with every decision of the connection.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from defang.core import wire
from defang.core.config import FilterSection

DEFAULT_MAX_NOTES_BYTES = FilterSection().max_notes_bytes  # [filter] max_notes_bytes, as declared


def client_address(ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``conn.ip`` as an address (None when it is none): ``[...]`` and ``IPv6:`` taken off,
    and an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, a dual-stack socket's) read as
    the IPv4 address it is, so that one client is one address to every list and network
    it is compared with."""
    try:
        addr = ipaddress.ip_address((ip or "").strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class NotesError(ValueError):
    """``conn.notes`` cannot be sent back: not a dict, not JSON, or too big."""


class Connection:
    """One SMTP connection as the MTA described it.

    ``esmtp_args`` are the MAIL FROM ESMTP arguments (e.g. ``["SIZE=1234",
    "BODY=8BITMIME"]``); ``rcpt_args`` are the RCPT TO arguments of the recipient
    being decided in ``filter_recipient`` (empty elsewhere).  ``conn.tag(name)`` names
    what fired, as ``msg.tag`` does.  ``trial`` is True when ``defang test`` or ``defang
    replay`` runs the hooks, not the MTA: a filter that sends mail or changes the world
    by itself (notices of its own, re-injection, a database) checks it.
    """

    __slots__ = ("id", "ip", "hostname", "port", "helo", "macros", "notes", "esmtp_args", "rcpt_args",
                 "decision", "trial", "recipient", "policy_key")  # fmt: skip

    def __init__(
        self,
        id: Any = None,
        ip: str | None = None,
        hostname: str | None = None,
        port: int | None = None,
        helo: str | None = None,
        macros: dict[str, str] | None = None,
        notes: dict[str, Any] | None = None,
        esmtp_args: list[str] | None = None,
        rcpt_args: list[str] | None = None,
    ) -> None:
        #: the connection's ID in defang's log lines (not the MTA's queue ID)
        self.id = id
        #: the client's IP address as the MTA saw it (e.g. "203.0.113.5", "2001:db8::1")
        self.ip = ip
        #: the client's host name as the MTA resolved it; "[ip]" when it did not
        self.hostname = hostname
        #: the client's TCP port
        self.port = port
        #: the HELO/EHLO name, from filter_helo on (None before)
        self.helo = helo
        #: the milter macros the MTA sent, by name without braces ("i" the queue ID, "j"
        #: the MTA's host name, "auth_authen" the SASL login, ...)
        self.macros = macros if macros is not None else {}
        #: the filter's own JSON-safe dict for the whole SMTP connection, kept from hook to
        #: hook even when different workers run them (at most ``[filter] max_notes_bytes``)
        self.notes = notes if notes is not None else {}
        #: the MAIL FROM ESMTP arguments (["SIZE=1234", "BODY=8BITMIME"])
        self.esmtp_args = esmtp_args if esmtp_args is not None else []
        #: the RCPT TO ESMTP arguments of the recipient filter_recipient is deciding
        #: (["NOTIFY=NEVER"]); empty in the other hooks
        self.rcpt_args = rcpt_args if rcpt_args is not None else []
        #: the running hook's decision (the runner sets it): where conn.tag() goes
        self.decision: Any = None
        #: a trial (defang test, replay), not live mail: the runner sets it
        self.trial = False
        #: the recipient filter_recipient is deciding (None in the other hooks)
        self.recipient: str | None = None
        #: the policy group filter_recipient put the recipient in (``policy``), None: the default
        self.policy_key: str | None = None

    def policy(self, key: str) -> None:
        """Put the recipient ``filter_recipient`` is deciding in policy group ``key``
        (``conn.policy("strict")``): a transaction takes only recipients of one group, the
        others get ``452 4.5.3`` and the client sends them again in a new transaction; end of
        message tells the hooks the group as ``msg.policy``.  No call: the default group."""
        if self.recipient is None:
            raise RuntimeError("conn.policy() is for filter_recipient")
        if not isinstance(key, str) or not key or len(key) > 64 or not key.isprintable():
            raise ValueError(f"a policy key is a printable string of 1 to 64 characters, not {key!r}")
        self.policy_key = key

    def tag(self, name: str) -> None:
        """Name what fired (``conn.tag("rbl_zen")``): counted by tag in ``defangctl status``."""
        if self.decision is None:
            raise RuntimeError("conn.tag() is for the hooks defang calls")
        self.decision.tag(name)

    @classmethod
    def from_request(cls, request: wire.DecisionRequest) -> Connection:
        """Build from a decision request: its ``conn``, and the ESMTP args its op carries."""
        c = request.conn
        conn = cls(id=c.id, ip=c.ip, hostname=c.hostname, port=c.port, helo=c.helo,
                   macros=dict(c.macros), notes=c.notes, esmtp_args=list(request.esmtp_args),
                   rcpt_args=list(request.rcpt_args))  # fmt: skip
        conn.recipient = getattr(request, "recipient", None)
        return conn

    def __repr__(self) -> str:
        return (
            f"Connection(id={self.id!r}, ip={self.ip!r}, hostname={self.hostname!r}, "
            f"port={self.port!r}, helo={self.helo!r})"
        )


def encode_notes(notes: Any, max_bytes: int = DEFAULT_MAX_NOTES_BYTES) -> str:
    """The JSON text of ``notes``; ``NotesError`` saying why it cannot be sent back."""
    if not isinstance(notes, dict):
        raise NotesError(f"conn.notes must be a dict, not {type(notes).__name__}")
    try:
        text = json.dumps(notes, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise NotesError(f"conn.notes is not JSON-safe: {exc}") from None
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise NotesError(f"conn.notes is {size} bytes as JSON; the limit is {max_bytes}")
    return text
