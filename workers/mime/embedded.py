"""Files hidden where mail clients still find them: inside text parts and inside winmail.dat.

A MIME walk sees a text/plain part; Outlook, Thunderbird and many webmails see the
uuencoded ``begin 644 invoice.exe`` block inside it as an attachment, and so did
MIMEDefang's walk.  So defang's walk (``defang.workers.mime.walk``) lists each of these
as a part of its own below the part that carries it, with its file name and its
decoded bytes, and ``part.embedded`` saying how it was hidden:

* ``uuencode``: ``begin MODE NAME`` ... ``end`` blocks in a text part (``binascii``
  decodes the lines; a short or damaged line is read as far as it goes, as
  ``uudecode`` does);
* ``yenc``: ``=ybegin ... name=NAME`` ... ``=yend`` blocks (yEnc: each byte minus 42,
  ``=`` escapes the next one minus 64 more; no library for it exists on PyPI that is
  maintained, and the decoding is those two lines);
* ``binhex``: a BinHex 4.0 block (``(This file must be converted with BinHex 4.0)``):
  the file name is read from its header; its data is left encoded (``binascii`` lost
  its BinHex codec in Python 3.11), so ``payload`` is the block as sent;
* ``tnef``: the files inside an ``application/ms-tnef`` part (winmail.dat), read by
  the tnefparse library.

These finders are pure functions on bytes: no parts, no I/O.  Each block is found by
its byte span in the carrying part's decoded payload, so that dropping it
(``part.drop()``) rewrites the carrier without those bytes.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

#: the marks a carrier must hold before it is decoded and searched (cheap test first)
MARKS = (b"begin ", b"=ybegin ", b"BinHex 4.0")

_UU_BEGIN = re.compile(rb"^begin(?:-base64)? +([0-7]{3,4})(?: +([^\r\n]*?))?[ \t]*\r?$", re.M)
_UU_END = re.compile(rb"^end[ \t]*\r?$", re.M)
_Y_BEGIN = re.compile(rb"^=ybegin (?=.*\bname=([^\r\n]+))[^\r\n]*\r?$", re.M)
_Y_END = re.compile(rb"^=yend\b[^\r\n]*\r?$", re.M)
_HQX_START = re.compile(rb"\(This file must be converted with BinHex 4\.0\)[ \t]*\r?\n(?:[ \t]*\r?\n)*:",
                        re.M)
_HQX_ALPHABET = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
_HQX_VALUE = {c: i for i, c in enumerate(_HQX_ALPHABET)}


@dataclass(frozen=True)
class Embedded:
    """One file inside a carrier: how it was hidden, its name, its bytes, where it lies."""

    kind: str  # uuencode, yenc, binhex, tnef
    filename: str
    data: bytes
    start: int = 0  # byte span in the carrier's decoded payload (tnef: the whole part)
    end: int = 0


def find_in_text(text: bytes, limit: int = 0) -> list[Embedded]:
    """Every uuencoded, yEnc and BinHex block in a text part's decoded bytes, in order.

    ``limit``: stop decoding once this many bytes came out in all (0: no limit); the
    blocks past it are still listed, with their data cut short.
    """
    if not any(mark in text for mark in MARKS):
        return []
    found = _uuencoded(text) + _yenc(text) + _binhex(text)
    found.sort(key=lambda e: e.start)
    if limit:
        total, kept = 0, []
        for e in found:
            room = max(limit - total, 0)
            cut = e if len(e.data) <= room else Embedded(e.kind, e.filename, e.data[:room], e.start, e.end)
            kept.append(cut)
            total += len(e.data)
        found = kept
    return found


def _name(raw: bytes | None) -> str:
    """A block's file name as text; a block without one (``begin 644``) still hides a file."""
    return (raw or b"").strip().strip(b'"').decode("utf-8", "replace") or "unnamed"


def _uuencoded(text: bytes) -> list[Embedded]:
    out = []
    for m in _UU_BEGIN.finditer(text):
        end = _UU_END.search(text, m.end())
        stop = end.end() if end else len(text)
        body = text[m.end() : end.start() if end else len(text)]
        data = bytearray()
        for line in body.splitlines():
            line = line.rstrip(b"\r")
            if not line or line in (b"`", b" "):
                continue
            try:
                data += binascii.a2b_uu(line)
            except binascii.Error:
                # a line with trailing garbage or missing padding: as far as its count says
                n = ((line[0] - 32) & 63) * 4 + 5
                try:
                    data += binascii.a2b_uu(line[: n // 3])
                except binascii.Error:
                    continue
        out.append(Embedded("uuencode", _name(m.group(2)), bytes(data), m.start(), stop))
    return out


def _yenc(text: bytes) -> list[Embedded]:
    out = []
    for m in _Y_BEGIN.finditer(text):
        name = m.group(1)
        end = _Y_END.search(text, m.end())
        stop = end.end() if end else len(text)
        data = bytearray()
        for line in text[m.end() : end.start() if end else len(text)].splitlines():
            if line.startswith((b"=ypart ", b"=ypart\t")):
                continue
            escaped = False
            for b in line.rstrip(b"\r"):
                if escaped:
                    data.append((b - 106) & 0xFF)  # minus 64, minus 42
                    escaped = False
                elif b == 0x3D:  # "="
                    escaped = True
                else:
                    data.append((b - 42) & 0xFF)
        out.append(Embedded("yenc", _name(name), bytes(data), m.start(), stop))
    return out


def _binhex(text: bytes) -> list[Embedded]:
    out = []
    for m in _HQX_START.finditer(text):
        close = text.find(b":", m.end())
        stop = close + 1 if close >= 0 else len(text)
        block = text[m.end() : stop - 1 if close >= 0 else len(text)]
        out.append(Embedded("binhex", _hqx_name(block), text[m.start() : stop], m.start(), stop))
    return out


def _hqx_name(block: bytes) -> str:
    """The file name in a BinHex 4.0 header: 6-bit characters, run-length coded, then a
    length byte and the name."""
    bits = bitcount = 0
    raw = bytearray()
    for c in block:
        v = _HQX_VALUE.get(c)
        if v is None:
            continue
        bits, bitcount = (bits << 6) | v, bitcount + 6
        if bitcount >= 8:
            bitcount -= 8
            raw.append((bits >> bitcount) & 0xFF)
        if len(raw) > 200:
            break
    data = bytearray()
    i = 0
    while i < len(raw):  # 0x90 n: repeat the previous byte n-1 more times (0x90 0: a 0x90)
        if raw[i] == 0x90 and i + 1 < len(raw):
            n = raw[i + 1]
            data += b"\x90" if n == 0 else bytes([data[-1]]) * (n - 1) if data else b""
            i += 2
        else:
            data.append(raw[i])
            i += 1
    if not data or data[0] == 0 or len(data) < 1 + data[0]:
        return "unnamed"
    return data[1 : 1 + data[0]].decode("mac_roman", "replace")


def find_in_tnef(data: bytes) -> tuple[list[Embedded], str | None]:
    """The files inside a winmail.dat, and why none could be read (None: it was read)."""
    try:
        from tnefparse import TNEF  # only when a message carries one

        tnef = TNEF(data, do_checksum=False)
        files = [Embedded("tnef", _tnef_name(a), bytes(a.data or b""), 0, 0) for a in tnef.attachments]
    except Exception as exc:  # a hostile blob: the part stays, the filter is told
        return [], f"winmail.dat not readable ({type(exc).__name__}: {exc})"
    return files, None


def _tnef_name(attachment: object) -> str:
    try:
        name = attachment.long_filename()  # type: ignore[attr-defined]
    except Exception:
        name = getattr(attachment, "name", "")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name).strip("\x00").strip() or "unnamed"
