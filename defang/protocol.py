"""The wire format between the milter front end, the multiplexor and the workers.

Sans-IO: nothing here touches a socket.  The I/O loops feed received bytes to a
``FrameDecoder`` and write what ``encode`` returns.

Theory of operation
-------------------
A frame is a 4-byte big-endian unsigned length N followed by N bytes of UTF-8 JSON
holding one object.  JSON rather than pickle: the schema is explicit, a worker cannot
smuggle arbitrary objects to the daemons, and a frame is readable in a packet dump.
Every decoder has a size limit (``max_frame_size``); a longer announced length is a
``ProtocolError`` before a single byte of the body is buffered, so a garbage length
cannot make a daemon allocate gigabytes.

Every request carries ``"v": VERSION``.  A peer that receives another version answers
with an error reply instead of guessing.

Requests (front end -> multiplexor; the multiplexor forwards decision requests to a
worker unchanged):

=========  ===================================================================
op         fields besides ``v`` and ``op``
=========  ===================================================================
hello      (none) -> answered by the multiplexor itself: ``gen``, ``hooks``
connect    ``conn``
helo       ``conn``
mail       ``conn``, ``sender``, ``args``
rcpt       ``conn``, ``sender``, ``recipient``, ``args``
eom        ``conn``, ``sender``, ``sender_args``, ``recipients``, ``queue_id``,
           ``spool`` (path of the spooled raw message), ``size``
=========  ===================================================================

``conn`` is ``{"id", "ip", "hostname", "port", "helo", "macros", "notes"}``.

Replies (worker -> multiplexor -> front end)::

    {"verdict": VERDICT, "actions": [[name, arg, ...], ...], "notes": {...},
     "retiring": bool, "error": optional str}

``VERDICT`` is ``{"action": "continue"|"accept"|"reject"|"tempfail"|"discard",
"code": str|None, "dsn": str|None, "text": str|None}``.  Actions are listed in
``ACTIONS``; the front end applies them in order at end of message.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20
#: What the multiplexor's and the workers' I/O loops take from a socket per read, into a
#: buffer they make once.  ``recv(n)`` makes a new bytes object of n bytes per read, and
#: at the 256 KiB read before, glibc gave it a mapping of its own (mmap, page faults,
#: munmap): 4 page faults per message in the multiplexor, 2 in a worker, measured.
RECV_SIZE = 65536

DECISION_OPS = frozenset({"connect", "helo", "mail", "rcpt", "eom"})
REQUEST_OPS = DECISION_OPS | {"hello"}

# name -> number of arguments after the name
ACTIONS: dict[str, int] = {
    "add_header": 2,  # name, value
    "insert_header": 3,  # index (0 = top), name, value
    "change_header": 3,  # name, value, index (1-based among headers of that name)
    "delete_header": 2,  # name, index (1-based)
    "add_recipient": 2,  # address, esmtp args (str or None)
    "delete_recipient": 1,  # address
    "change_sender": 2,  # address, esmtp args (str or None)
    "hold": 1,  # reason (MTA hold queue)
    "replace_body": 1,  # path of a file holding the new body
}

VERDICT_ACTIONS = frozenset({"continue", "accept", "reject", "tempfail", "discard"})


class ProtocolError(Exception):
    """A peer sent something this protocol does not allow."""


# Made once: ``json.dumps`` with arguments builds a new encoder on every call, which
# costs as much as encoding a small request.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode_json = json.JSONDecoder().decode


def encode(obj: dict[str, Any]) -> bytes:
    """One frame for ``obj``."""
    body = _encode_json(obj).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(body)) + body


def encode_raw(body: bytes) -> bytes:
    """One frame around an already encoded JSON body (the multiplexor forwards as is)."""
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        # UTF-8, as encode writes it (json.loads would first guess among UTF-8/16/32)
        obj = _decode_json(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


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


def check_request(obj: dict[str, Any]) -> str:
    """Validate the envelope of a request; return its op."""
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (want {VERSION})")
    op = obj.get("op")
    if op not in REQUEST_OPS:
        raise ProtocolError(f"unknown op {op!r}")
    return op


def verdict(
    action: str, code: str | None = None, dsn: str | None = None, text: str | None = None
) -> dict[str, Any]:
    return {"action": action, "code": code, "dsn": dsn, "text": text}


def error_reply(code: str, dsn: str, text: str, error: str) -> dict[str, Any]:
    """A reply made by a daemon (not a worker) when no worker could decide."""
    return {
        "verdict": verdict("tempfail" if code.startswith("4") else "reject", code, dsn, text),
        "actions": [],
        "notes": None,
        "retiring": False,
        "error": error,
    }
