"""Run the worker's own MIME code once in the zygote, before any worker is forked.

Why: much of what parsing a message needs is made on first use, not at import: the
header classes of ``email.headerregistry`` (one per header name), regexes compiled
into the ``re`` cache, codecs imported on first lookup (``encodings.*``), the lazy
attributes of the ``email`` policy.  Made in each worker, they are private memory
times the number of workers (measured: +1.3 MB per worker with the benchmark's
header filter).  Made here once, every worker shares them.

Only defang's code runs here (the part walk and what a part offers), never the
admin's hooks: filter.py may have side effects, and sees real mail only.
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile

from defang.core import wire
from defang.core.verdicts import CONTINUE
from defang.workers.api.conn import Connection
from defang.workers.api.message import Message
from defang.workers.mime import mailpolicy

_SAMPLE = (
    "From: =?utf-8?q?Warm_Up?= <warm@example.org>\r\n"
    "To: <up@example.org>\r\n"
    "Subject: =?iso-8859-1?q?d=E9fang?= warm-up\r\n"
    "Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
    "Message-ID: <warm-up@defang.invalid>\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="w1"\r\n'
    "\r\n"
    "preamble\r\n"
    "--w1\r\n"
    'Content-Type: multipart/alternative; boundary="w2"\r\n'
    "\r\n"
    "--w2\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "Hello.\r\n"
    "--w2\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n"
    "<p>H=C3=A9llo.</p>\r\n"
    "--w2--\r\n"
    "--w1\r\n"
    'Content-Type: application/octet-stream; name="report.pdf"\r\n'
    'Content-Disposition: attachment; filename="report.pdf"\r\n'
    "Content-Transfer-Encoding: base64\r\n"
    "\r\n"
    "{b64}\r\n"
    "--w1\r\n"
    "Content-Type: message/rfc822\r\n"
    "\r\n"
    "Subject: inner\r\n"
    "Content-Type: text/plain; charset=iso-8859-1\r\n"
    "\r\n"
    "inner\r\n"
    "--w1--\r\n"
)


def warm_up() -> None:
    """Walk a small message of the usual shapes and read what filters read. Never raises."""
    blob = base64.encodebytes(b"%PDF-1.4 warm-up " * 8).decode("ascii").replace("\n", "\r\n").strip()
    fd, path = tempfile.mkstemp(prefix="defang-warm-up-", suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_SAMPLE.format(b64=blob).encode("ascii"))
        # a request and a reply through the wire, as a worker reads and answers one
        conn = wire.ConnInfo("warm", "192.0.2.1", "warm.example", 25, "warm.example", {"i": "W"}, {})
        body = wire.encode_body(wire.EndOfMessage(conn, path, "warm@example.org", ["up@example.org"], "W"))
        request = wire.decode(body, wire.REQUESTS)
        msg = Message.from_request(request, Connection.from_request(request))
        wire.encode(wire.Reply(CONTINUE, [["add_header", "X-Warm", "up"]], {}))
        seen: list[object] = [msg.subject, msg.get_header("From")]
        for part in msg.parts:
            seen += (part.content_type, part.filename, part.charset, part.disposition,
                     part.is_attachment, part.extensions, part.defects)  # fmt: skip
            if not part.is_multipart:
                seen.append(part.payload)
            for name in ("content-type", "content-disposition"):  # a header's attributes,
                header = part.head.get(name)  # which the stdlib parses when read
                seen.append(header.params if header is not None else None)
        seen.append(msg.email)
        state = sys.modules.get("defang.workers.api.state")
        if state is not None:  # the filter uses the shared state: its back end's code now
            state.preload()
    except Exception:  # a warm-up that fails costs memory, never the start
        pass
    finally:
        os.unlink(path)
        # what the sample left in the header tables would be freed by each worker's
        # first messages, and freeing an object writes to the zygote's page it is on
        # (measured: 0.3 MB more private memory per worker)
        mailpolicy.forget()
