"""Text copied from a message into the filter's actions is cleaned, never a tempfail,
through a real Postfix (issue 25, items 4 and 8): a decoded Subject with CR LF in it
copied into add_header and change_header arrives as one valid folded header each, a
tag with a '/' is counted, a header name with a space is added with a '-'."""

from __future__ import annotations

import email
import email.policy

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix

pytestmark = [pytest.mark.integration, needs_postfix]

# The subject decodes to "Invoice\r\nBcc: victim@example.org": copied verbatim into a
# header, the second line would be a header of its own.
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
           b"Subject: =?utf-8?Q?Invoice=0D=0ABcc:_victim@example.org?=\r\n"
           b"Message-ID: <odd-text@example.org>\r\nX-Kind: message/partial\r\n\r\nHello Bob\r\n")  # fmt: skip


def test_a_decoded_subject_with_cr_lf_is_delivered_in_a_folded_header(tmp_path) -> None:
    settings = {"quarantine": {"dir": str(tmp_path / "q")}}
    with Stack(FILTERS / "odd_text.py", settings=settings) as stack:
        r = stack.send(MESSAGE)
        assert r.data[0] == 250, r  # not 451: no retry would ever pass
        m = stack.arrived(b"odd-text@example.org")
        head = m.raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        assert b"\r\nX-Original-Subject: Invoice\r\n Bcc: victim@example.org\r\n" in head
        assert b"\r\nSubject: [scanned] Invoice\r\n Bcc: victim@example.org\r\n" in head
        assert b"\r\nX-Virus-Name: none found\r\n" in head
        assert b"\r\nX-Defang-Would: reject 550 5.7.1 two lines: Invoice Bcc: victim@example.org " \
               b"(filter_end)\r\n" in head  # fmt: skip
        parsed = email.message_from_bytes(m.raw, policy=email.policy.default)
        assert parsed["Bcc"] is None and m.rcpts == ["bob@example.org"]
        assert parsed["X-Original-Subject"] == "Invoice Bcc: victim@example.org"
        assert not [d for d in parsed.defects], parsed.defects
        assert stack.defang.status()["tags"] == {"message_partial": 1}
