"""A non-blocking framed socket for the multiplexor's event loop.

The loop calls ``read()`` when the selector says readable and gets whole frame
bodies; ``send()`` queues a frame and writes what the kernel takes now; the rest goes
out when the selector reports the socket writable (``wants_write``).
"""

from __future__ import annotations

import socket

from defang.core.framing import RECV_SIZE, FrameDecoder

# Reads go into one buffer that every channel shares: the multiplexor's loop reads one
# socket at a time (see RECV_SIZE).
_recv_view = memoryview(bytearray(RECV_SIZE))


class Closed(Exception):
    """The peer closed the connection (or it broke)."""


class Channel:
    __slots__ = ("sock", "decoder", "outbuf", "fd")

    def __init__(self, sock: socket.socket, max_frame_size: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = FrameDecoder(max_frame_size)
        self.outbuf = bytearray()

    def read(self) -> list[bytes]:
        """Frame bodies now complete.  Raises Closed at EOF, ProtocolError on garbage."""
        try:
            n = self.sock.recv_into(_recv_view)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise Closed(str(exc)) from None
        if not n:
            raise Closed("EOF")
        return self.decoder.feed(_recv_view[:n])

    def send(self, frame: bytes) -> None:
        if self.outbuf:
            self.outbuf += frame
            return
        try:
            n = self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            raise Closed(str(exc)) from None
        if n < len(frame):
            self.outbuf += frame[n:]

    def flush(self) -> None:
        """Write more of the queued bytes (the socket was reported writable)."""
        if not self.outbuf:
            return
        try:
            n = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise Closed(str(exc)) from None
        del self.outbuf[:n]

    @property
    def wants_write(self) -> bool:
        return bool(self.outbuf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
