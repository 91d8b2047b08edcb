"""Length-prefixed frames: how defang's stream sockets cut bytes into messages.

Sans-IO: nothing here touches a socket.  The I/O loops feed received bytes to a
``FrameDecoder`` and write what ``frame`` returns.  What goes inside a frame is
``defang.core.wire``'s business.

A frame is a 4-byte big-endian unsigned length N followed by N bytes.  Every decoder has
a size limit (``max_frame_size``); a longer announced length is a ``ProtocolError``
before a single byte of the body is buffered, so a garbage length cannot make a daemon
allocate gigabytes.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20
#: What the multiplexor's and the workers' I/O loops take from a socket per read, into a
#: buffer they make once.  ``recv(n)`` makes a new bytes object of n bytes per read, and
#: at the 256 KiB read before, glibc gave it a mapping of its own (mmap, page faults,
#: munmap): 4 page faults per message in the multiplexor, 2 in a worker, measured.
RECV_SIZE = 65536


class ProtocolError(Exception):
    """A peer sent something defang's protocols do not allow (a bad frame or message)."""


def frame(body: bytes) -> bytes:
    """One frame around ``body``."""
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies; raises ``ProtocolError`` on garbage."""

    __slots__ = ("_buf", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the bodies of all frames now complete."""
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        while len(buf) >= 4:
            (length,) = HEADER.unpack_from(buf)
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds max_frame_size {self.max_frame_size}"
                )
            end = 4 + length
            if len(buf) < end:
                break
            bodies.append(bytes(buf[4:end]))
            del buf[:end]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)
