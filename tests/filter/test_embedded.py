"""Files hidden where mail clients still find them: uuencode, yEnc and BinHex blocks in
text parts, files inside winmail.dat.  The walk lists each as a part with its name and
bytes; the default filter refuses an .exe hidden that way as it refuses an attached one;
dropping one removes its block and keeps the text around it."""

from __future__ import annotations

import binascii
import struct
import textwrap
from dataclasses import replace

import pytest

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.workers.mime.embedded import find_in_text, find_in_tnef

EXE = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(range(256)) * 3 + b"=\r\n.\x00"


def uuencode(name: str, data: bytes) -> bytes:
    lines = [binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45)]
    return f"begin 644 {name}\n".encode() + b"".join(lines) + b"`\nend\n"


def yencode(name: str, data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        c = (b + 42) & 0xFF
        if c in (0x00, 0x0A, 0x0D, 0x3D):
            out += bytes([0x3D, (c + 64) & 0xFF])
        else:
            out.append(c)
    body = b"\n".join(bytes(out[i : i + 128]) for i in range(0, len(out), 128))
    head = f"=ybegin line=128 size={len(data)} name={name}\n".encode()
    return head + body + f"\n=yend size={len(data)}\n".encode()


def binhex_header(name: str) -> bytes:
    """A BinHex 4.0 block with the header (name, type, creator, flags, lengths) and no fork."""
    alphabet = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
    raw = bytes([len(name)]) + name.encode() + b"\x00" + b"APPLMSWD" + b"\x00\x00" + struct.pack(">II", 0, 0)
    raw += b"\x00\x00"  # crc (not checked when reading the name)
    bits, n, out = 0, 0, bytearray()
    for b in raw:
        bits, n = (bits << 8) | b, n + 8
        while n >= 6:
            n -= 6
            out.append(alphabet[(bits >> n) & 63])
    if n:
        out.append(alphabet[(bits << (6 - n)) & 63])
    return b"(This file must be converted with BinHex 4.0)\n\n:" + bytes(out) + b":\n"


def tnef(files: list[tuple[str, bytes]]) -> bytes:
    """A winmail.dat with these files: TNEF signature, key, and per file the attachment
    attributes tnefparse reads (rendering data, title, data), each with its checksum."""

    def attr(level: int, name: int, kind: int, data: bytes) -> bytes:
        checksum = struct.pack("<H", sum(data) & 0xFFFF)
        return struct.pack("<BHHI", level, name, kind, len(data)) + data + checksum

    out = struct.pack("<IH", 0x223E9F78, 0x0001)
    for name, data in files:
        out += attr(2, 0x9002, 0x0006, b"\x00" * 14)
        out += attr(2, 0x8010, 0x0001, name.encode() + b"\x00")
        out += attr(2, 0x800F, 0x0006, data)
    return out


def text_message(body: bytes) -> bytes:
    return (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: see inside\r\n"
            b"Content-Type: text/plain\r\n\r\n" + body.replace(b"\n", b"\r\n"))  # fmt: skip


def tnef_message(blob: bytes) -> bytes:
    enc = binascii.b2a_base64(blob, newline=False)
    lines = b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))
    return (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: winmail\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b'--b\r\nContent-Type: application/ms-tnef; name="winmail.dat"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + lines + b"\r\n--b--\r\n")  # fmt: skip


def test_each_kind_is_found_with_its_name_and_bytes():
    text = b"hello\n" + uuencode("a.exe", EXE) + b"between\n" + yencode("b.scr", EXE) + binhex_header("c.app")
    found = find_in_text(text)
    assert [(e.kind, e.filename) for e in found] == [("uuencode", "a.exe"), ("yenc", "b.scr"),
                                                     ("binhex", "c.app")]
    assert found[0].data == EXE and found[1].data == EXE
    assert text[found[0].start : found[0].end].startswith(b"begin 644 a.exe")
    files, problem = find_in_tnef(tnef([("invoice.exe", EXE), ("notes.txt", b"hi")]))
    assert problem is None
    assert [(f.filename, f.data) for f in files] == [("invoice.exe", EXE), ("notes.txt", b"hi")]


def test_plain_text_that_only_looks_alike_is_left_alone():
    assert find_in_text(b"Let us begin 644 days from now.\nbegin the work\n=ybegin without a name\n") == []
    assert find_in_tnef(b"not tnef at all")[1].startswith("winmail.dat not readable (ValueError")


@pytest.fixture(scope="module")
def trial():
    t = Trial(configmod.load(None))
    yield t
    t.close()


HIDDEN_EXE = [uuencode("setup.exe", EXE), yencode("setup.exe", EXE), binhex_header("setup.exe")]


@pytest.mark.parametrize("block", HIDDEN_EXE, ids=["uuencode", "yenc", "binhex"])
def test_the_default_filter_refuses_an_exe_hidden_in_a_text_part(trial, block):
    r = trial.run(text_message(b"Please run the attached program.\n\n" + block + b"\nThanks\n"), Envelope())
    assert r.error is None
    assert (r.outcome["action"], r.outcome["code"]) == ("reject", "554")
    assert r.outcome["text"] == "Executable attachments are not accepted (exe)"


def test_the_default_filter_refuses_an_exe_inside_winmail_dat(trial):
    r = trial.run(tnef_message(tnef([("invoice.exe", EXE)])), Envelope())
    assert r.outcome["action"] == "reject"
    assert r.outcome["text"] == "Executable attachments are not accepted (exe)"
    r = trial.run(tnef_message(tnef([("notes.txt", b"hi")])), Envelope())
    assert r.outcome["action"] == "continue"


DROPPER = '''
SEEN = []

def filter_part(msg, part):
    SEEN.append((part.index, part.embedded, part.filename, part.content_type))
    if part.embedded and part.filename.endswith(".exe"):
        part.drop_with_warning(f"{part.filename} ({part.embedded}) was removed")
'''


def test_dropping_a_hidden_file_removes_its_block_and_keeps_the_text(tmp_path):
    (tmp_path / "filter.py").write_text(textwrap.dedent(DROPPER))
    t = Trial(replace(configmod.load(None), filter=tmp_path / "filter.py"))
    try:
        body = (b"Dear all,\n\n" + uuencode("evil.exe", EXE) + b"\nand a picture:\n"
                + uuencode("cat.gif", b"GIF89a....") + b"\n" + yencode("worse.exe", EXE)
                + b"Regards\n")  # fmt: skip
        r = t.run(text_message(body), Envelope(), body_out=str(tmp_path / "out.eml"))
        seen = t.runner.loaded.module.SEEN
        assert [s[1:3] for s in seen] == [(None, None), ("uuencode", "evil.exe"), ("uuencode", "cat.gif"),
                                          ("yenc", "worse.exe")]  # fmt: skip
        assert [s[0] for s in seen] == [0, 1, 2, 3]  # document order
        out = (tmp_path / "out.eml").read_bytes()
    finally:
        t.close()
    assert r.outcome["action"] == "continue"
    assert b"begin 644 evil.exe" not in out and b"=ybegin" not in out
    assert b"begin 644 cat.gif" in out  # kept
    for text in (b"Dear all,", b"and a picture:", b"Regards"):
        assert text in out
    assert b"evil.exe (uuencode) was removed" in out and b"worse.exe (yenc) was removed" in out
