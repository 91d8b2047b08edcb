"""Body changes and defang's quarantine through a real Sendmail: an executable in a zip is
replaced by a notice and quarantined, text parts get a boilerplate, and ``defang
quarantine release`` hands the original back to the same Sendmail (its own binary, as
``[quarantine] sendmail_path``), which delivers it without asking the milter again
(Sendmail filters mail that arrives over SMTP only)."""

from __future__ import annotations

import base64
import email.policy
import io
import json
import zipfile
from email.parser import BytesParser

import pytest
from daemon import FILTERS
from mta import SendmailStack, needs_sendmail, quarantine_cli, wait_for

from defang.testbed.smtpclient import normalize_for_smtp

pytestmark = [pytest.mark.integration, needs_sendmail]

PARSER = BytesParser(policy=email.policy.default)


def zipped(name: str, data: bytes) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, data)
    return base64.encodebytes(buf.getvalue()).decode()


def exe_message(message_id: str) -> bytes:
    return f"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: your parcel
Date: Mon, 07 Dec 2026 10:00:00 +0000
Message-ID: <{message_id}>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b1"

--b1
Content-Type: text/plain; charset=us-ascii

The tracking details are attached.
--b1
Content-Type: application/zip; name="parcel.zip"
Content-Disposition: attachment; filename="parcel.zip"
Content-Transfer-Encoding: base64

{zipped("label.pdf.exe", b"MZ" + bytes(300))}--b1--
""".encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("mime-sendmail")
    wrapper = work / "sendmail"
    s = SendmailStack(FILTERS / "mime_postfix.py",
                      settings={"quarantine": {"dir": str(work / "quarantine"), "release_method": "sendmail",
                                               "sendmail_path": str(wrapper)}})  # fmt: skip
    s.sendmail.write_wrapper(wrapper)  # Sendmail's own binary with the test bed's config
    with s:
        yield s


def arrivals(stack, marker: bytes, count: int) -> list:
    def found() -> list:
        got = [m for m in stack.sink.messages() if marker in m.raw]
        return got if len(got) >= count else []

    return wait_for(f"{count} message(s) with {marker!r}", found, timeout=60)


def test_the_body_is_rewritten_the_original_quarantined_and_released_through_sendmail(stack):
    data = exe_message("parcel@example.org")
    r = stack.send(data)
    assert r.data[0] == 250 and r.queue_id, r
    (got,) = arrivals(stack, b"<parcel@example.org>", 1)
    parts = [p for p in PARSER.parsebytes(got.raw).walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain"]
    body, notice = parts
    assert body.get_content().count("-- scanned by defang --") == 1
    assert notice.get_filename() == "parcel.zip.removed.txt"
    assert b"application/zip" not in got.raw

    (entry,) = [e for e in json.loads(quarantine_cli(stack, "list", "--json").stdout)
                if e["queue_id"] == r.queue_id]  # fmt: skip  # Sendmail's {i}, from MAIL FROM's macros
    assert entry["reasons"] == ["parcel.zip holds an executable"]
    assert entry["sender"] == "alice@example.org" and entry["recipients"] == ["bob@example.org"]
    assert entry["id"] in notice.get_content()

    done = quarantine_cli(stack, "release", entry["id"], "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    _, released = arrivals(stack, b"<parcel@example.org>", 2)
    assert released.mail_from == "alice@example.org" and released.rcpts == ["bob@example.org"]
    # Sendmail's Received header for the submission, then the message as the client sent it
    assert released.raw.startswith(b"Received: (from root@localhost)\r\n\tby testbed.defang.invalid ")
    assert released.strip_received() == normalize_for_smtp(data)
