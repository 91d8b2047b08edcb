"""MIMEDefang's suggested filter, ported, behind a real Postfix: client -> Postfix ->
defang (filters/examples/mimedefang/suggested_minimum.py) -> sink.

What arrives is what a MIMEDefang site expects: the redundant HTML alternative gone, a
dropped attachment's warning as the first part, an ambiguous MIME structure rebuilt so
that every reader sees the part the filter saw, and well-formed mail untouched."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser

import pytest
from daemon import REPO
from mta import Stack, needs_postfix

from defang.testbed.smtpclient import normalize_for_smtp
from defang.workers.mime.walk import walk

pytestmark = [pytest.mark.integration, needs_postfix]

PARSER = BytesParser(policy=email.policy.default)
FILTER = REPO / "filters" / "examples" / "mimedefang" / "suggested_minimum.py"

NEWSLETTER = b"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: newsletter with a tool
Message-ID: <md-newsletter@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mix"

--mix
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=us-ascii

Hello Bob, plain.
--alt
Content-Type: text/html; charset=us-ascii

<html><body><p>Hello Bob, <b>HTML</b>.</p></body></html>
--alt--
--mix
Content-Type: application/octet-stream; name="setup.exe"
Content-Disposition: attachment; filename="setup.exe"
Content-Transfer-Encoding: base64

TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
--mix--
"""

# The inner multipart reuses the outer boundary: Python's parser (and clients that read
# as it does) end it at once and find notes.txt in the epilogue, others inside it.
AMBIGUOUS = b"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: ambiguous
Message-ID: <md-ambiguous@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="same"

--same
Content-Type: multipart/alternative; boundary="same"

--same
Content-Type: text/plain

text
--same--
--same
Content-Type: text/plain; name="notes.txt"
Content-Disposition: attachment; filename="notes.txt"

the notes
--same--
"""

PLAIN_MIXED = b"""\
From: Alice <alice@example.org>
To: bob@example.org
Subject: report
Message-ID: <md-plain@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="m"

preamble
--m
Content-Type: text/plain; charset=us-ascii

See the report.
--m
Content-Type: application/pdf; name="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K
--m--
epilogue
"""


@pytest.fixture(scope="module")
def stack():
    with Stack(FILTER) as s:
        yield s


def leaves(raw: bytes) -> list[tuple[str, str | None, bytes]]:
    return [(p.content_type, p.filename, p.payload.strip()) for p in walk(PARSER.parsebytes(raw))
            if not p.is_multipart]  # fmt: skip


def test_html_alternative_dropped_and_the_warning_first(stack) -> None:
    r = stack.send(NEWSLETTER)
    assert r.data and r.data[0] == 250, r
    got = stack.arrived(b"<md-newsletter@example.org>")
    parts = leaves(got.raw)
    assert [(t, n) for t, n, _ in parts] == [("text/plain", None), ("text/plain", None)]
    warning, plain = parts
    assert warning[2].startswith(b"An attachment named setup.exe was removed from this document")
    assert plain[2] == b"Hello Bob, plain."
    assert b"text/html" not in got.raw and b"TVqQ" not in got.raw


def test_an_ambiguous_structure_arrives_rebuilt_as_the_filter_read_it(stack) -> None:
    sent = [p for p in walk(PARSER.parsebytes(AMBIGUOUS), owner=object()) if not p.is_multipart]
    assert any(p.hidden and p.filename == "notes.txt" for p in sent), "the walk finds it in the epilogue"
    r = stack.send(AMBIGUOUS)
    assert r.data and r.data[0] == 250, r
    got = stack.arrived(b"<md-ambiguous@example.org>")
    arrived = list(walk(PARSER.parsebytes(got.raw), owner=object()))
    assert not any(p.hidden for p in arrived), "nothing is hidden from any reader any more"
    assert ("text/plain", "notes.txt", b"the notes") in leaves(got.raw)
    assert got.raw.count(b'boundary="same"') == 1, "the inner multipart has a boundary of its own"


def test_well_formed_mail_arrives_byte_for_byte(stack) -> None:
    r = stack.send(PLAIN_MIXED)
    assert r.data and r.data[0] == 250, r
    got = stack.arrived(b"<md-plain@example.org>")
    assert got.raw.split(b"\r\n\r\n", 1)[1] == normalize_for_smtp(PLAIN_MIXED).split(b"\r\n\r\n", 1)[1]
