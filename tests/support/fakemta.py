"""The MTA's side of the milter protocol (version 6), for unit tests of the front end.

Sans-IO codec (``encode_command`` / ``decode_replies``) plus a small blocking session
that speaks it over a socket.  It plays what Postfix does: negotiate, send macros and
each stage, and collect the milter's modification actions and final reply.  A fake
MTA never proves interoperability (the Postfix tests do); it lets us drive the front
end byte for byte: garbage, odd stage orders, stages Postfix would skip.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

# Protocol bits (libmilter mfapi.h)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40)  # fmt: skip
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA = 0x1000, 0x2000, 0x4000, 0x8000, 0x10000
P_NR_UNKN, P_NR_EOH, P_NR_BODY, P_HDR_LEADSPC = 0x20000, 0x40000, 0x80000, 0x100000
ALL_PROTOCOL = 0x1FFFFF
ALL_ACTIONS = 0x1FF  # ADDHDRS .. SETSYMLIST

NO_REPLY_BIT = {b"C": P_NR_CONN, b"H": P_NR_HELO, b"M": P_NR_MAIL, b"R": P_NR_RCPT,
                b"L": P_NR_HDR, b"B": P_NR_BODY, b"N": P_NR_EOH, b"T": P_NR_DATA}  # fmt: skip
FINAL = {b"c": "continue", b"a": "accept", b"r": "reject", b"t": "tempfail", b"d": "discard",
         b"y": "reply"}  # fmt: skip


def encode_command(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def cstrings(*items: str | bytes) -> bytes:
    return b"".join((i.encode() if isinstance(i, str) else i) + b"\0" for i in items)


def decode_packets(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Whole (command, data) packets removed from the front of ``buf``."""
    out = []
    while len(buf) >= 5:
        (n,) = struct.unpack_from(">I", buf)
        if len(buf) < 4 + n:
            break
        out.append((bytes(buf[4:5]), bytes(buf[5 : 4 + n])))
        del buf[: 4 + n]
    return out


@dataclass
class Result:
    """What the milter answered to one stage: its final reply and any actions before it."""

    reply: str  # continue, accept, reject, tempfail, discard, reply, noreply
    text: str = ""  # for "reply": "550 5.7.1 text"
    actions: list[tuple[str, tuple]] = field(default_factory=list)


def parse_action(cmd: bytes, data: bytes) -> tuple[str, tuple]:
    parts = data.split(b"\0")
    if cmd == b"h":
        return "addheader", (parts[0].decode(), parts[1].decode())
    if cmd == b"i":
        (idx,) = struct.unpack(">I", data[:4])
        p = data[4:].split(b"\0")
        return "insheader", (idx, p[0].decode(), p[1].decode())
    if cmd == b"m":
        (idx,) = struct.unpack(">I", data[:4])
        p = data[4:].split(b"\0")
        return "chgheader", (idx, p[0].decode(), p[1].decode())
    if cmd == b"+":
        return "addrcpt", (parts[0].decode(),)
    if cmd == b"2":
        return "addrcpt_par", (parts[0].decode(), parts[1].decode())
    if cmd == b"-":
        return "delrcpt", (parts[0].decode(),)
    if cmd == b"e":
        return "chgfrom", (parts[0].decode(), parts[1].decode() if len(parts) > 2 else "")
    if cmd == b"q":
        return "quarantine", (parts[0].decode(),)
    if cmd == b"b":
        return "replbody", (data,)
    return cmd.decode(errors="replace"), (data,)


class MilterSession:
    """One MTA connection to a milter socket (unix path or (host, port))."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0,
                 actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> None:  # fmt: skip
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = bytearray()
        self.sock.sendall(encode_command(b"O", struct.pack(">III", 6, actions, protocol)))
        cmd, data = self._packet()
        assert cmd == b"O", cmd
        self.version, self.actions, self.protocol = struct.unpack(">III", data[:12])

    def close(self) -> None:
        try:
            self.sock.sendall(encode_command(b"Q"))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> MilterSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _packet(self) -> tuple[bytes, bytes]:
        while True:
            packets = decode_packets(self.buf)
            if packets:
                # push back extras
                first, rest = packets[0], packets[1:]
                for c, d in reversed(rest):
                    self.buf[:0] = encode_command(c, d)
                return first
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("milter closed the connection")
            self.buf += data

    def macros(self, stage: bytes, **values: str) -> None:
        payload = stage + b"".join(cstrings(k if len(k) == 1 else "{" + k + "}", v)
                                   for k, v in values.items())  # fmt: skip
        self.sock.sendall(encode_command(b"D", payload))

    def stage(self, cmd: bytes, data: bytes = b"") -> Result:
        """Send one stage; read the reply unless it was negotiated away."""
        skip_bits = {b"C": P_NOCONNECT, b"H": P_NOHELO, b"M": P_NOMAIL, b"R": P_NORCPT,
                     b"L": P_NOHDRS, b"B": P_NOBODY, b"N": P_NOEOH, b"T": P_NODATA}  # fmt: skip
        if cmd in skip_bits and self.protocol & skip_bits[cmd]:
            return Result("skipped")
        self.sock.sendall(encode_command(cmd, data))
        if cmd in NO_REPLY_BIT and self.protocol & NO_REPLY_BIT[cmd]:
            return Result("noreply")
        actions = []
        while True:
            c, d = self._packet()
            if c in FINAL:
                text = d.rstrip(b"\0").decode(errors="replace") if c == b"y" else ""
                return Result(FINAL[c], text, actions)
            if c == b"p":
                continue
            name, args = parse_action(c, d)
            if name in ("addheader", "insheader", "chgheader") and self.protocol & P_HDR_LEADSPC:
                # the MTA writes "Name:" + value: the milter sends the space itself
                value = args[-1]
                assert value == "" or value[0] in " \t", f"{name} value {value!r} lacks its space"
                args = (*args[:-1], value[1:] if value[:1] == " " else value)
            actions.append((name, args))

    # Conveniences that mirror an SMTP transaction
    def connect(self, hostname="client.example", ip="192.0.2.7", port=40000) -> Result:
        self.macros(b"C", j="mx.test", daemon_name="test-mta")
        return self.stage(b"C", cstrings(hostname) + b"4" + struct.pack(">H", port) + cstrings(ip))

    def helo(self, name="client.example") -> Result:
        return self.stage(b"H", cstrings(name))

    def mail(self, sender: str, *args: str) -> Result:
        return self.stage(b"M", cstrings(f"<{sender}>", *args))

    def rcpt(self, recipient: str, *args: str) -> Result:
        return self.stage(b"R", cstrings(f"<{recipient}>", *args))

    def message(self, raw: bytes, queue_id: str = "TESTQ1", chunk: int = 65535) -> Result:
        """Headers, EOH, body chunks, end of message; returns the end-of-message result."""
        self.stage(b"T")
        head, _, body = raw.partition(b"\r\n\r\n")
        fields: list[list[bytes]] = []
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1][1] += b"\r\n" + line
            elif b":" in line:
                name, value = line.split(b":", 1)
                fields.append([name, value])
        lead = bool(self.protocol & P_HDR_LEADSPC)
        for name, value in fields:
            if not lead:
                value = value.lstrip(b" ")
            r = self.stage(b"L", name + b"\0" + value.replace(b"\r\n", b"\n") + b"\0")
            if r.reply not in ("noreply", "continue", "skipped"):
                return r
        self.stage(b"N")
        for i in range(0, len(body), chunk):
            r = self.stage(b"B", body[i : i + chunk])
            if r.reply not in ("noreply", "continue", "skipped"):
                return r
        self.macros(b"E", i=queue_id)
        return self.stage(b"E")
