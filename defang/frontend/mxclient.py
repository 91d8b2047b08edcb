"""The front end's client for the multiplexor socket.

Blocking on purpose: the front end's callbacks run on libmilter's threads, and a
blocking recv releases the GIL while the worker thinks.  Connections are pooled (one
request in flight per connection), so a message costs no connect() per decision.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

from defang.core import wire
from defang.core.framing import FrameDecoder, ProtocolError

RECV_SIZE = 16 * 1024


class MultiplexorError(Exception):
    """No decision could be had from the multiplexor (down, timed out, broken frame)."""


class MultiplexorClient:
    def __init__(self, path: str, timeout: float, max_frame_size: int, pool_max: int = 64) -> None:
        self.path = path
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.pool_max = pool_max
        self._idle: list[tuple[socket.socket, float]] = []  # each with the timeout it was opened with
        self._lock = threading.Lock()

    def set_timeout(self, timeout: float) -> None:
        """A reload changed the timeout: new connections get it, pooled ones are closed when
        next given back (their kernel timeouts are the old one)."""
        self.timeout = timeout

    def decide(self, request: wire.DecisionRequest) -> wire.Reply:
        return self._request(request, wire.Reply)

    def hello(self) -> wire.HelloReply:
        return self._request(wire.Hello(), wire.HelloReply)

    def _request(self, request: wire.Message, expected: type) -> Any:
        frame = wire.encode(request)
        if len(frame) - 4 > self.max_frame_size:
            raise MultiplexorError(f"request of {len(frame)} bytes exceeds max_frame_size")
        sock, reused, timeout = self._take()
        try:
            reply = self._exchange(sock, frame, expected)
        except (OSError, ProtocolError, MultiplexorError) as exc:
            sock.close()
            # A pooled connection may have died with a previous multiplexor: one fresh try,
            # only when nothing came back at all (the request never reached a worker).
            if not (reused and isinstance(exc, BrokenPipeError | ConnectionResetError | _Eof)):
                raise MultiplexorError(_describe(exc)) from None
            sock, timeout = self._connect(), self.timeout
            try:
                reply = self._exchange(sock, frame, expected)
            except (OSError, ProtocolError, MultiplexorError) as exc2:
                sock.close()
                raise MultiplexorError(_describe(exc2)) from None
        self._give(sock, timeout)
        return reply

    def _exchange(self, sock: socket.socket, frame: bytes, expected: type) -> Any:
        sock.sendall(frame)
        decoder = FrameDecoder(self.max_frame_size)
        while True:
            # One recv holds a whole small reply: each recv lets the GIL go, and taking it
            # back is a wait on the other libmilter threads' callbacks.
            data = sock.recv(RECV_SIZE)
            if not data:
                raise _Eof("multiplexor closed the connection")
            bodies = decoder.feed(data)
            if bodies:
                break
        if len(bodies) > 1 or decoder.pending:  # one request, one reply: more would answer the next
            raise ProtocolError("bytes after the reply")
        reply = wire.decode(bodies[0], wire.TO_FRONT_END)
        if not isinstance(reply, expected):
            raise ProtocolError(f"a {reply.OP} reply where a {expected.OP} was due")
        return reply

    def _take(self) -> tuple[socket.socket, bool, float]:
        with self._lock:
            if self._idle:
                return *self._idle.pop(), True  # type: ignore[return-value]
        timeout = self.timeout
        return self._connect(timeout), False, timeout

    def _give(self, sock: socket.socket, timeout: float) -> None:
        with self._lock:
            if len(self._idle) < self.pool_max and timeout == self.timeout:
                self._idle.append((sock, timeout))
                return
        sock.close()

    def _connect(self, timeout: float | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The timeout is the kernel's (SO_RCVTIMEO, SO_SNDTIMEO; a wait past it fails with
        # EAGAIN), not settimeout(): on a socket with a Python timeout every send and recv
        # is a poll() first, one more syscall and one more time the GIL is let go.
        timeout = self.timeout if timeout is None else timeout
        seconds = int(timeout)
        timeval = struct.pack("@ll", seconds, int((timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise MultiplexorError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return sock

    def close(self) -> None:
        with self._lock:
            for s, _ in self._idle:
                s.close()
            self._idle.clear()


class _Eof(OSError):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
        return "no answer in time"
    return str(exc) or exc.__class__.__name__
