"""MIME rewriting and the quarantine end to end: client -> Postfix -> defang -> sink.

One stack for the module: a private Postfix on loopback with defang as its milter,
relaying to smtp-sink.  Release goes through the same Postfix's sendmail (pickup),
which does not pass the milter again (``non_smtpd_milters`` is empty in the test bed),
so the sink receives the original message.
"""

from __future__ import annotations

import base64
import email.policy
import io
import json
import re
import time
import zipfile
from email.parser import BytesParser

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix, quarantine_cli

from defang.testbed.smtpclient import normalize_for_smtp
from defang.workers.mime.text import decode_charset
from defang.workers.mime.walk import walk

pytestmark = [pytest.mark.integration, needs_postfix]

PARSER = BytesParser(policy=email.policy.default)
FILTER = FILTERS / "mime_postfix.py"


def zip_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


EXE_ZIP = zip_of([("readme.txt", b"read me"), ("invoice.pdf.exe", b"MZ" + b"\0" * 200)])

EXE_MESSAGE = f"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: invoice attached
Message-ID: <exe-zip@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mix"

--mix
Content-Type: text/plain; charset=utf-8

Please find the invoice attached.
--mix
Content-Type: application/zip; name="invoice.zip"
Content-Disposition: attachment; filename="invoice.zip"
Content-Transfer-Encoding: base64

{b64(EXE_ZIP)}--mix--
""".encode()

ALTERNATIVE_MESSAGE = b"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: newsletter
Message-ID: <alternative@example.org>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=us-ascii

Hello Bob, plain.
--alt
Content-Type: text/html; charset=us-ascii

<html><body><p>Hello Bob, <b>HTML</b>.</p></body></html>
--alt--
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("mime-postfix")
    qdir = work / "quarantine"
    sendmail = work / "sendmail"
    s = Stack(FILTER, settings={"quarantine": {"dir": str(qdir), "release_method": "sendmail",
                                               "sendmail_path": str(sendmail)}})  # fmt: skip
    # "sendmail pointed at it": Postfix's sendmail with the private instance's config
    sendmail.write_text(f'#!/bin/sh\nexec /usr/sbin/sendmail -C "{s.postfix.config_dir}" "$@"\n')
    sendmail.chmod(0o755)
    s.quarantine_dir = qdir
    with s:
        yield s


def wait_for(stack, message_id: bytes, count: int = 1, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in stack.sink.messages() if message_id in m.raw]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            logs = f"{stack.defang.log()[-3000:]}\n{stack.postfix.log_text()[-3000:]}"
            raise AssertionError(f"{message_id!r}: {len(found)} of {count} messages at the sink\n{logs}")
        time.sleep(0.05)


def test_exe_in_a_zip_is_replaced_by_a_notice_and_quarantined(stack) -> None:
    r = stack.send(EXE_MESSAGE)
    assert r.data and r.data[0] == 250, r
    (got,) = wait_for(stack, b"<exe-zip@example.org>")
    msg = PARSER.parsebytes(got.raw)
    parts = [p for p in walk(msg) if not p.is_multipart]
    assert [p.content_type for p in parts] == ["text/plain", "text/plain"]
    body, notice = parts
    assert decode_charset(body.payload, body.charset).count("-- scanned by defang --") == 1
    assert notice.filename == "invoice.zip.removed.txt" and notice.disposition == "attachment"
    text = decode_charset(notice.payload, notice.charset)
    assert text.startswith("The attachment invoice.zip held an executable. Quarantined as ")
    qid = text.rsplit(" ", 1)[1].rstrip(".")
    assert b"application/zip" not in got.raw and b64(EXE_ZIP)[:40].encode() not in got.raw
    assert got.mail_from == "alice@example.org" and got.rcpts == ["bob@example.org"]

    listed = json.loads(quarantine_cli(stack, "list", "--json").stdout)
    entry = [e for e in listed if e["id"] == qid]
    assert entry, listed
    meta = entry[0]
    assert meta["sender"] == "alice@example.org" and meta["recipients"] == ["bob@example.org"]
    assert meta["conn"]["ip"] == "127.0.0.1" and meta["queue_id"]
    assert meta["queue_id"] in stack.postfix.log_text()
    assert meta["reasons"] == ["invoice.zip holds an executable"]
    shown = quarantine_cli(stack, "show", qid)
    assert shown.returncode == 0 and "reason:     invoice.zip holds an executable" in shown.stdout
    # the quarantine holds the original message, byte for byte as the client sent it
    stored = stack.quarantine_dir / qid[:4] / qid[4:6] / qid[6:8] / qid / "message.eml"
    assert stored.read_bytes() == normalize_for_smtp(EXE_MESSAGE)


def test_boilerplate_arrives_in_both_alternatives(stack) -> None:
    r = stack.send(ALTERNATIVE_MESSAGE)
    assert r.data and r.data[0] == 250, r
    (got,) = wait_for(stack, b"<alternative@example.org>")
    msg = PARSER.parsebytes(got.raw)
    plain, html = (p for p in walk(msg) if not p.is_multipart)
    plain_text, html_text = (decode_charset(p.payload, p.charset) for p in (plain, html))
    assert plain_text.count("-- scanned by defang --") == 1 and plain_text.startswith("Hello Bob, plain.")
    assert html_text.count('<p class="defang">scanned by defang</p>') == 1
    assert html_text.index('<p class="defang">') < html_text.index("</body>")
    assert msg["Subject"] == "newsletter" and msg.get_content_type() == "multipart/alternative"


def test_release_delivers_the_original_message(stack) -> None:
    r = stack.send(EXE_MESSAGE.replace(b"<exe-zip@example.org>", b"<exe-release@example.org>"))
    assert r.data and r.data[0] == 250, r
    (rewritten,) = wait_for(stack, b"<exe-release@example.org>")
    assert b"application/zip" not in rewritten.raw
    entries = json.loads(quarantine_cli(stack, "list", "--json").stdout)
    (entry,) = [e for e in entries if e["queue_id"] and "<exe-release@example.org>" in
                json.dumps(e["headers"])]  # fmt: skip
    qid = entry["id"]
    done = quarantine_cli(stack, "release", qid, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["released"]["recipients"] == ["bob@example.org"]
    first, released = wait_for(stack, b"<exe-release@example.org>", count=2)
    assert b"application/zip" in released.raw and released.mail_from == "alice@example.org"
    assert released.rcpts == ["bob@example.org"]
    original = normalize_for_smtp(EXE_MESSAGE.replace(b"<exe-zip@example.org>", b"<exe-release@example.org>"))
    # Postfix's pickup adds its Received header and, for a local submission without
    # one, a Date header; everything else is the message exactly as the client sent it
    arrived = released.strip_received()
    arrived = re.sub(rb"\r\nDate: [^\r\n]+\(UTC\)\r\n\r\n", b"\r\n\r\n", arrived, count=1)
    assert arrived == original
    zips = [p for p in walk(PARSER.parsebytes(released.raw)) if p.content_type == "application/zip"]
    assert zips[0].payload == EXE_ZIP
    shown = json.loads(quarantine_cli(stack, "show", qid, "--json").stdout)
    assert len(shown["releases"]) == 1
