"""``msg.spamassassin()``, ``msg.clamav()``, ``part.clamav()``, ``msg.start_checks()``:
when the scanners are asked, and what the filter gets back.

Each check runs at most once per message and its result is kept: a second
``msg.spamassassin()`` costs nothing.  ``msg.start_checks("spamassassin", "clamav")``
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
from dataclasses import dataclass
from typing import Any

from defang.core.config import ConfigError, socket_address
from defang.workers.checks import clamd, spamd
from defang.workers.checks.exchange import Exchange, run
from defang.workers.checks.results import SpamResult, VirusResult

log = logging.getLogger("defang.filter")
CHECKS = ("spamassassin", "clamav")
_READ = 64 * 1024


@dataclass(frozen=True)
class Scanner:
    """Where a daemon is and how long to wait for it (``[spamassassin]``, ``[clamav]``)."""

    section: str
    address: str = ""
    connect_timeout: float = 2.0
    timeout: float = 30.0
    max_size: int = 512000
    user: str = ""
    fd_passing: bool = True
    received: bool = False  # spamd: put the hop's Return-Path/Received before the message

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
    spamassassin: Scanner = Scanner("spamassassin", received=True)
    clamav: Scanner = Scanner("clamav", timeout=60.0, max_size=25 * 1024 * 1024)

    @classmethod
    def from_config(cls, cfg: Any) -> ScanSettings:
        return cls(
            Scanner("spamassassin", cfg.spamassassin_address, cfg.spamassassin_connect_timeout,
                    cfg.spamassassin_timeout, cfg.spamassassin_max_size, cfg.spamassassin_user,
                    received=cfg.spamassassin_add_received),
            Scanner("clamav", cfg.clamav_address, cfg.clamav_connect_timeout, cfg.clamav_timeout,
                    cfg.clamav_max_size, fd_passing=cfg.clamav_fd_passing),
        )  # fmt: skip


class _Pending:
    """A check under way: its exchange, how to read the answer, what to close after."""

    __slots__ = ("exchange", "parse", "fd")

    def __init__(self, exchange: Exchange, parse: Callable[[bytes, float], Any], fd: int | None) -> None:
        self.exchange, self.parse, self.fd = exchange, parse, fd


class Scans:
    """One message's checks: started at most once each, results kept, failures logged once."""

    def __init__(self, settings: ScanSettings, path: str, size: int, queue_id: str,
                 hop: Callable[[], bytes] = bytes) -> None:  # fmt: skip
        self.settings = settings
        self.path = path
        self.size = size
        self.queue_id = queue_id or "-"
        self._hop = hop  # the Return-Path/Received lines spamd gets before the message
        self.results: dict[str, Any] = {}
        self._pending: dict[str, _Pending] = {}

    # --- starting

    def start(self, *names: str) -> None:
        for name in names:
            if name not in CHECKS:
                raise ValueError(f"start_checks({name!r}): the checks are {', '.join(CHECKS)}")
            if name in self.results or name in self._pending:
                continue
            result = self._begin(name)
            if result is not None:
                self._keep(name, result)

    def _begin(self, name: str) -> Any:
        """Start check ``name``; a result right away if it cannot be started."""
        if name == "spamassassin":
            s = self.settings.spamassassin
            if s.off:
                return SpamResult(skipped=s.off)
            if self.size > s.max_size:
                why = (f"message is {self.size} bytes, over [spamassassin] max_size {s.max_size}: not sent "
                       "(as spamc does)")
                return SpamResult(skipped=why, oversize=self.size)
            hop = self._hop() if s.received else b""
            request = spamd.request(len(hop) + self.size, self._chunks(hop), s.user)
            return self._exchange(name, s, request, spamd.parse, None, half_close=True)
        s = self.settings.clamav
        if s.off:
            return VirusResult(skipped=s.off)
        target = s.target()
        if isinstance(target, str) and s.fd_passing:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                return VirusResult(error=f"cannot open the spool file: {exc.strerror}")
            return self._exchange(name, s, clamd.fildes(fd), clamd.parse, fd)
        if self.size > s.max_size:
            return VirusResult(skipped=f"message is {self.size} bytes, over [clamav] max_size {s.max_size}: "
                                       "not streamed", oversize=self.size)  # fmt: skip
        return self._exchange(name, s, clamd.instream(self._chunks()), clamd.parse, None)

    def _exchange(self, name: str, s: Scanner, request: Iterator[Any], parse: Any, fd: int | None,
                  half_close: bool = False) -> None:  # fmt: skip
        ex = Exchange(name, s.target(), request, connect_timeout=s.connect_timeout, timeout=s.timeout,
                      half_close=half_close)  # fmt: skip
        self._pending[name] = _Pending(ex, parse, fd)
        ex.start()
        return None

    def _chunks(self, first: bytes = b"") -> Iterator[bytes]:
        if first:
            yield first
        with open(self.path, "rb") as f:
            while chunk := f.read(_READ):
                yield chunk

    # --- results

    def result(self, name: str) -> Any:
        if name not in self.results:
            self.start(name)
        if name not in self.results:
            pending = self._pending[name]
            run([p.exchange for p in self._pending.values()], until=pending.exchange)
            for done in [n for n, p in self._pending.items() if p.exchange.done]:
                self._finish(done)
        return self.results[name]

    def _finish(self, name: str) -> None:
        p = self._pending.pop(name)
        if p.fd is not None:
            os.close(p.fd)
        ex = p.exchange
        if ex.error:
            result = SpamResult(error=ex.error) if name == "spamassassin" else VirusResult(error=ex.error)
        else:
            result = p.parse(bytes(ex.answer), ex.seconds)
        self._keep(name, result)

    def _keep(self, name: str, result: Any) -> None:
        self.results[name] = result
        if result.error:
            log.warning("%s: %s", self.queue_id, result)
        elif result.skipped and not result.skipped.startswith("not configured"):
            log.info("%s: %s", self.queue_id, result)

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

    def close(self) -> None:
        """The hooks are done: drop what was never read (sockets, the file passed)."""
        for name in list(self._pending):
            p = self._pending.pop(name)
            p.exchange.abandon()
            if p.fd is not None:
                os.close(p.fd)


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
