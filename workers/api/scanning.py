"""``msg.spamassassin()``, ``msg.rspamd()``, ``msg.clamav()``, ``part.clamav()``,
``msg.start_checks()``: when the scanners are asked, and what the filter gets back.

Each check runs at most once per message (and per user: ``msg.spamassassin(user=...)``
asks as that user, spamd's ``User``, rspamd's ``Deliver-To``) and its result is kept: a
second ``msg.spamassassin()`` costs nothing.  ``msg.start_checks("spamassassin", "clamav")``
(in ``filter_begin``, typically) sends both requests at once and returns; the daemons
work while the hooks go on, and the first read of a result waits for it, driving the
others too (``defang.workers.checks.exchange``): the waits overlap.  A check not started
starts when it is first read.

Every failure is a result (``result.error``, or ``result.skipped`` for a check that is
not configured or a message over its size cap, with ``result.oversize``), never an
exception, and is logged once per message with the queue ID (WARNING; a skip at INFO).  A
check left unread when the hooks end is closed by the runner (``Scans.close``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from defang.core.config import ClamavSection, ConfigError, RspamdSection, SpamassassinSection, socket_address
from defang.workers.checks import clamd, rspamd, spamd
from defang.workers.checks.exchange import Exchange, run
from defang.workers.checks.received import hop_headers
from defang.workers.checks.results import RspamdResult, SpamResult, VirusResult

log = logging.getLogger("defang.filter")
CHECKS = ("spamassassin", "clamav", "rspamd")
_READ = 64 * 1024


@dataclass(frozen=True)
class Scanner:
    """Where a daemon is and how long to wait for it (``[spamassassin]``, ``[clamav]``,
    ``[rspamd]``)."""

    section: str
    address: str = ""
    connect_timeout: float = 2.0
    timeout: float = 30.0
    max_size: int = 512000
    user: str = ""
    fd_passing: bool = True
    received: bool = False  # spamd: put the hop's Return-Path/Received before the message

    @classmethod
    def of(cls, section: Any) -> Scanner:
        """A scanner from its section as declared in defang.core.config (``[spamassassin]
        add_received`` is ``received`` here)."""
        values = {("received" if f.name == "add_received" else f.name): getattr(section, f.name)
                  for f in fields(section)}  # fmt: skip
        return cls(section.SECTION, **values)

    @property
    def off(self) -> str | None:
        return None if self.address else f"not configured ([{self.section}] address is empty)"

    def target(self) -> str | tuple[str, int]:
        try:
            return socket_address(self.address)
        except ConfigError as exc:  # the config refused it already; a Scanner built by hand
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class ScanSettings:
    spamassassin: Scanner = Scanner.of(SpamassassinSection())
    clamav: Scanner = Scanner.of(ClamavSection())
    rspamd: Scanner = Scanner.of(RspamdSection())

    @classmethod
    def from_config(cls, cfg: Any) -> ScanSettings:
        """The three scanner sections of a ``defang.core.config.Config``."""
        return cls(*(Scanner.of(cfg.section(s)) for s in (SpamassassinSection, ClamavSection, RspamdSection)))


@dataclass(frozen=True)
class Envelope:
    """What the MTA said about the message, for the checks that want it: spamd gets it as
    the ``Received:`` line of the hop (``defang.workers.checks.received``), rspamd as the
    headers of its request."""

    ip: str | None = None
    hostname: str | None = None
    helo: str | None = None
    sender: str = ""
    recipients: tuple[str, ...] = ()
    queue_id: str = ""
    by: str = "localhost"  # this host (the MTA's j macro)
    tls: bool = False
    auth_user: str = ""  # the SMTP-authenticated user, if any


_RESULTS = {"spamassassin": SpamResult, "clamav": VirusResult, "rspamd": RspamdResult}


class _Pending:
    """A check under way: its exchange, how to read the answer, what to close after."""

    __slots__ = ("exchange", "parse", "fd")

    def __init__(self, exchange: Exchange, parse: Callable[[bytes, float], Any], fd: int | None) -> None:
        self.exchange, self.parse, self.fd = exchange, parse, fd


Key = tuple[str, "str | None"]  # a check and the user it runs as (None: the configured one)


def _user(user: str | None) -> str | None:
    if user is not None and (not user or not user.isprintable() or any(c.isspace() for c in user)):
        raise ValueError(f"user={user!r}: a user name is printable, with no space")
    return user


class Scans:
    """One message's checks: started at most once each (per user), results kept, failures
    logged once."""

    def __init__(self, settings: ScanSettings, path: str, size: int, queue_id: str,
                 envelope: Envelope | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.path = path
        self.size = size
        self.queue_id = queue_id or "-"
        self.envelope = envelope or Envelope(queue_id=queue_id)
        self._hop: bytes | None = None
        self.results: dict[Key, Any] = {}
        self._pending: dict[Key, _Pending] = {}

    def hop(self) -> bytes:
        """The ``Return-Path:``/``Received:`` lines spamd gets before the message, made once
        (one date); empty with ``[spamassassin] add_received = false``."""
        if not self.settings.spamassassin.received:
            return b""
        if self._hop is None:
            e = self.envelope
            self._hop = hop_headers(ip=e.ip, hostname=e.hostname, helo=e.helo, by=e.by, queue_id=e.queue_id,
                                    sender=e.sender, recipients=e.recipients, tls=e.tls,
                                    auth=bool(e.auth_user))  # fmt: skip
        return self._hop

    # --- starting

    def start(self, *names: str, user: str | None = None) -> None:
        for name in names:
            if name not in CHECKS:
                raise ValueError(f"start_checks({name!r}): the checks are {', '.join(CHECKS)}")
            key = (name, _user(user) if name != "clamav" else None)
            if key in self.results or key in self._pending:
                continue
            result = self._begin(key)
            if result is not None:
                self._keep(key, result)

    def _begin(self, key: Key) -> Any:
        """Start a check; a result right away if it cannot be started."""
        name, user = key
        s: Scanner = getattr(self.settings, name)
        if s.off:
            return _RESULTS[name](skipped=s.off)
        if name == "clamav":
            return self._begin_clamav(key, s)
        if self.size > s.max_size:
            tail = " (as spamc does)" if name == "spamassassin" else ""
            why = f"message is {self.size} bytes, over [{name}] max_size {s.max_size}: not sent{tail}"
            return _RESULTS[name](skipped=why, oversize=self.size)
        if name == "spamassassin":
            hop = self.hop()
            request = spamd.request(len(hop) + self.size, self._chunks(hop), s.user if user is None else user)
            return self._exchange(key, s, request, spamd.parse, None, half_close=True)
        e = self.envelope
        request = rspamd.request(self.size, self._chunks(), ip=e.ip, helo=e.helo, hostname=e.hostname,
                                 sender=e.sender, recipients=e.recipients, queue_id=e.queue_id,
                                 user=e.auth_user, deliver_to=user or "")  # fmt: skip
        return self._exchange(key, s, request, rspamd.parse, None)

    def _begin_clamav(self, key: Key, s: Scanner) -> Any:
        target = s.target()
        if isinstance(target, str) and s.fd_passing:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                return VirusResult(error=f"cannot open the spool file: {exc.strerror}")
            return self._exchange(key, s, clamd.fildes(fd), clamd.parse, fd)
        if self.size > s.max_size:
            return VirusResult(skipped=f"message is {self.size} bytes, over [clamav] max_size {s.max_size}: "
                                       "not streamed", oversize=self.size)  # fmt: skip
        return self._exchange(key, s, clamd.instream(self._chunks()), clamd.parse, None)

    def _exchange(self, key: Key, s: Scanner, request: Iterator[Any], parse: Any, fd: int | None,
                  half_close: bool = False) -> None:  # fmt: skip
        ex = Exchange(key[0], s.target(), request, connect_timeout=s.connect_timeout, timeout=s.timeout,
                      half_close=half_close)  # fmt: skip
        self._pending[key] = _Pending(ex, parse, fd)
        ex.start()
        return None

    def _chunks(self, first: bytes = b"") -> Iterator[bytes]:
        if first:
            yield first
        with open(self.path, "rb") as f:
            while chunk := f.read(_READ):
                yield chunk

    # --- results

    def result(self, name: str, user: str | None = None) -> Any:
        key = (name, _user(user) if name != "clamav" else None)
        if key not in self.results:
            self.start(name, user=user)
        if key not in self.results:
            pending = self._pending[key]
            run([p.exchange for p in self._pending.values()], until=pending.exchange)
            for done in [k for k, p in self._pending.items() if p.exchange.done]:
                self._finish(done)
        return self.results[key]

    def _finish(self, key: Key) -> None:
        p = self._pending.pop(key)
        if p.fd is not None:
            os.close(p.fd)
        ex = p.exchange
        result = _RESULTS[key[0]](error=ex.error) if ex.error else p.parse(bytes(ex.answer), ex.seconds)
        self._keep(key, result)

    def _keep(self, key: Key, result: Any) -> None:
        self.results[key] = result
        who = f" (user {key[1]})" if key[1] is not None else ""
        if result.error:
            log.warning("%s: %s%s", self.queue_id, result, who)
        elif result.skipped and not result.skipped.startswith("not configured"):
            log.info("%s: %s%s", self.queue_id, result, who)

    def scan_bytes(self, data: bytes, what: str) -> VirusResult:
        """clamd on bytes (a part's decoded body): INSTREAM, now, not kept."""
        s = self.settings.clamav
        if s.off:
            return VirusResult(skipped=s.off)
        if len(data) > s.max_size:
            result = VirusResult(skipped=f"{what} is {len(data)} bytes, over [clamav] max_size {s.max_size}: "
                                         "not streamed", oversize=len(data))  # fmt: skip
        else:
            ex = Exchange("clamav", s.target(), clamd.instream([data]), connect_timeout=s.connect_timeout,
                          timeout=s.timeout)  # fmt: skip
            run([ex])
            result = VirusResult(error=ex.error) if ex.error else clamd.parse(bytes(ex.answer), ex.seconds)
        if result.error:
            log.warning("%s: %s: %s", self.queue_id, what, result)
        elif result.skipped:
            log.info("%s: %s: %s", self.queue_id, what, result)
        return result

    def outcomes(self) -> list[str]:
        """The checks' outcomes for the per-message log line and the metrics:
        ``"name:outcome detail"``, the outcome one of spam, ham, virus, suspicious, clean,
        error or skipped (a few values: the metrics label them by it)."""
        return [outcome(result) for result in self.results.values()]

    def close(self) -> None:
        """The hooks are done: drop what was never read (sockets, the file passed)."""
        for name in list(self._pending):
            p = self._pending.pop(name)
            p.exchange.abandon()
            if p.fd is not None:
                os.close(p.fd)


def outcome(result: Any) -> str:
    """One check's result as ``name:outcome`` and, if scanned, its verdict in a few words."""
    if result.error:
        return f"{result.NAME}:error"
    if result.skipped:
        return f"{result.NAME}:skipped"
    if isinstance(result, VirusResult):
        kind = "clean" if result.category == "ok" else result.category
    else:
        kind = "spam" if result.is_spam else "ham"
    return f"{result.NAME}:{kind} {result.verdict()}"


def spam_headers(result: SpamResult) -> list[tuple[str, str]]:
    """``X-Spam-Status`` (SpamAssassin's form: ``SpamResult.status_header``),
    ``X-Spam-Score``, and ``X-Spam-Flag: YES`` on spam; for a message not scanned only
    ``X-Spam-Status: No, not scanned: <why>`` (200 characters at most): a parser of the
    first word still reads No, and nobody takes it for a score of 0."""
    if not result.scanned:
        return [("X-Spam-Status", f"No, not scanned: {result.error or result.skipped}"[:200])]
    out = [("X-Spam-Status", result.status_header()), ("X-Spam-Score", f"{result.score:.1f}")]
    if result.is_spam:
        out.append(("X-Spam-Flag", "YES"))
    return out
