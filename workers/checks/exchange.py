"""The only I/O of the checks: request/answer exchanges with scanner daemons, several at once.

spamd and clamd (and the like) speak one request and one answer per connection: connect,
send the request (a header and the message, or a file descriptor), read until the daemon
closes.  ``Exchange`` is one such conversation, non-blocking; ``run`` drives any number
of them in one ``selectors`` loop, so a filter that asks spamd and clamd about one message
waits for the slower, not for the sum, and without a thread in the worker.

``Exchange.start`` connects and writes what the socket takes at once (a message of a
few hundred KB, all of it on loopback), so the daemon is already at work while the
filter goes on; ``run`` waits for the answers.

Every way an exchange can fail ends it with an ``error`` text, never an exception: the
address is bad, the connection is refused or not made within ``connect_timeout``, the
daemon closes early or says nothing within ``timeout`` (counted from the start), the
answer passes ``max_answer`` bytes.  The codecs (``spamd``, ``clamd``) turn the bytes or
the error into a result.
"""

from __future__ import annotations

import array
import errno
import os
import selectors
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class PassFd:
    """In a request: pass this open file descriptor (SCM_RIGHTS, Unix sockets only)."""

    fd: int


Request = Iterator["bytes | PassFd"]


def describe(address: str | tuple[str, int]) -> str:
    return address if isinstance(address, str) else f"{address[1]}@{address[0]}"


class Exchange:
    """One request and its answer, on a connection of its own."""

    def __init__(self, name: str, address: str | tuple[str, int], request: Iterable[bytes | PassFd], *,
                 connect_timeout: float, timeout: float, max_answer: int = 1 << 20,
                 half_close: bool = False) -> None:  # fmt: skip
        self.name = name
        self.half_close = half_close
        self.address = address
        self._request = iter(request)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_answer = max_answer
        self.answer = bytearray()
        self.error: str | None = None
        self.done = False
        self.seconds = 0.0
        self._sock: socket.socket | None = None
        self._out = b""
        self._fd: int | None = None
        self._connecting = True
        self._sending = True
        self._start = 0.0

    @property
    def where(self) -> str:
        return describe(self.address)

    def deadline(self) -> float:
        return self._start + (self.connect_timeout if self._connecting else self.timeout)

    def start(self) -> None:
        """Connect and write what goes at once; the rest happens in ``run``."""
        self._start = time.monotonic()
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        if family == socket.AF_INET and ":" in self.address[0]:
            family = socket.AF_INET6
        try:
            kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            self._sock = socket.socket(family, kind)
            self._sock.connect(self.address)
        except (BlockingIOError, InterruptedError):
            return  # in progress: writable when made
        except OSError as exc:
            return self._fail(f"cannot connect to {self.where}: {exc.strerror or exc}")
        self._connected()

    def _connected(self) -> None:
        self._connecting = False
        self._pump()

    # --- readiness

    def want(self) -> int:
        if self._connecting or self._sending:
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def ready(self, mask: int) -> None:
        assert self._sock is not None
        if self._connecting:
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self._fail(f"cannot connect to {self.where}: {os.strerror(err)}")
            return self._connected()
        if self._sending:
            return self._pump()
        self._read()

    def _pump(self) -> None:
        """Write until the socket would block or the request is sent."""
        sock = self._sock
        assert sock is not None
        while True:
            if not self._out:
                item = next(self._request, None)
                if item is None:
                    self._sending = False
                    if self.half_close:
                        self._shut_write()
                    return
                if isinstance(item, PassFd):
                    try:
                        rights = array.array("i", [item.fd])
                        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                    except (BlockingIOError, InterruptedError):
                        self._request = _prepend(item, self._request)
                        return
                    except OSError as exc:
                        return self._sent_early(exc)
                    continue
                self._out = item
                continue
            try:
                n = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                return self._sent_early(exc)
            self._out = self._out[n:]

    def _shut_write(self) -> None:
        """Tell the daemon the request is over (spamd reads the message by lines: a last
        line without a newline is only over at end of file, or it waits for more)."""
        assert self._sock is not None
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                self._fail(f"sending to {self.where}: {exc.strerror or exc}")

    def _sent_early(self, exc: OSError) -> None:
        """The daemon stopped reading (clamd past StreamMaxLength answers, then closes):
        what it said, if anything, is the answer."""
        self._sending = False
        self._out = b""
        self._request = iter(())
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            self._fail(f"sending to {self.where}: {exc.strerror or exc}")

    def _read(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and self.answer:
                return self._finish()
            return self._fail(f"reading from {self.where}: {exc.strerror or exc}")
        if not data:
            return self._finish()
        self.answer += data
        if len(self.answer) > self.max_answer:
            self._fail(f"{self.where} answered more than {self.max_answer} bytes")

    def expire(self, now: float) -> None:
        waited = now - self._start
        if self._connecting:
            self._fail(f"no connection to {self.where} within {self.connect_timeout:g}s")
        else:
            self._fail(f"no answer from {self.where} within {self.timeout:g}s (waited {waited:.1f}s)")

    def _finish(self) -> None:
        self.done = True
        self.seconds = time.monotonic() - self._start
        self._close()

    def _fail(self, error: str) -> None:
        self.error = error
        self._finish()

    def abandon(self) -> None:
        """Nobody wants the answer any more: close the connection."""
        if not self.done:
            self._fail("abandoned")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()


def _prepend(item: bytes | PassFd, rest: Iterator[bytes | PassFd]) -> Iterator[bytes | PassFd]:
    yield item
    yield from rest


def run(exchanges: Iterable[Exchange], until: Exchange | None = None) -> None:
    """Drive the exchanges until all are done (or ``until`` is): each one's answer or error.

    Every exchange not yet started is started first; one left unfinished (``until`` came
    first) goes on in the next call.  A selector per turn of the loop: a handful of
    sockets, and no registration outlives a socket that an answer or a timeout closed.
    """
    pending = [ex for ex in exchanges if not ex.done]
    for ex in pending:
        if ex._start == 0.0:
            ex.start()
    while True:
        pending = [ex for ex in pending if not ex.done]
        if not pending or (until is not None and until.done):
            return
        now = time.monotonic()
        for ex in pending:
            if now >= ex.deadline():
                ex.expire(now)
        pending = [ex for ex in pending if not ex.done]
        if not pending or (until is not None and until.done):
            return
        with selectors.DefaultSelector() as sel:
            for ex in pending:
                sel.register(ex.fileno(), ex.want(), ex)
            wait = max(0.0, min(ex.deadline() for ex in pending) - time.monotonic())
            ready = sel.select(wait)
        for key, mask in ready:
            key.data.ready(mask)
