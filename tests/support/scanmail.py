"""Messages for the scanner tests (GTUBE, EICAR plain, zipped, forwarded; a clean one), and
a fake daemon that accepts and answers what it is told (or never answers)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import zipfile
from email.utils import formatdate

from defang.testbed.scanners import EICAR, GTUBE

# dated now: spamd compares the Date with the Received: defang writes for the hop
# (DATE_IN_PAST_96_XX and the like would score a message dated days ago)
HEAD = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: %s\r\n"
        b"Date: " + formatdate().encode() + b"\r\nMessage-ID: <%s.1@example.org>\r\n")  # fmt: skip


def message(subject: str, body: bytes, extra: bytes = b"") -> bytes:
    return HEAD % (subject.encode(), subject.replace(" ", "").encode()) + extra + b"\r\n" + body + b"\r\n"


def header(raw: bytes, name: bytes) -> str:
    """The one value of header ``name`` in a message as it arrived (unfolded)."""
    head = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    prefix = name.lower() + b":"
    lines = head.split(b"\r\n")
    values = [line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(prefix)]
    assert len(values) == 1, (name, values)
    return values[0].decode()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def multipart(subject: str, parts: list[bytes]) -> bytes:
    body = b"".join(b"--b\r\n" + p + b"\r\n" for p in parts) + b"--b--"
    return message(subject, body, b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n")


def zip_part(data: bytes) -> bytes:
    return (b"Content-Type: application/zip; name=docs.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(zipped("inner/readme.com", data)))  # fmt: skip


CLEAN = message("Lunch on Thursday", b"Shall we meet at noon?")
SPAM = message("Test spam", GTUBE)
VIRUS = message("Plain virus", EICAR)
VIRUS_ZIP = multipart("Zipped virus", [b"Content-Type: text/plain\r\n\r\nsee attached", zip_part(EICAR)])
VIRUS_FORWARDED = multipart("Forwarded virus", [
    b"Content-Type: text/plain\r\n\r\nfwd", b"Content-Type: message/rfc822\r\n\r\n" + VIRUS_ZIP])  # fmt: skip



class FakeDaemon:
    """A loopback server that accepts and then answers ``answer`` (None: never answers)."""

    def __init__(self, answer: bytes | None, read_first: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer, self.read_first = answer, read_first
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.answer is not None:
                if self.read_first:  # all of the request (until it pauses): a close with unread
                    conn.settimeout(0.3)  # bytes would be a reset, not the answer under test
                    try:
                        while conn.recv(1 << 20):
                            pass
                    except OSError:
                        pass
                conn.sendall(self.answer)
                conn.close()

    @property
    def address(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
