"""Monitor mode through a real Postfix: what the filter would have refused arrives, stamped.

Two ways of monitoring: the modular example chain with one rule switched to monitor
in the config (``[filter] monitor_rules``), next to a rule that still enforces; and the
whole filter in ``[filter] mode = "monitor"``, with a refusal at MAIL FROM (an envelope
stage: the stamp waits for the end of the message)."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon import REPO
from mta import Stack, needs_postfix

pytestmark = [pytest.mark.integration, needs_postfix]

MODULAR = REPO / "filters" / "examples" / "modular" / "filter.py"
EXE = (b"From: a@example.org\r\nTo: bob@example.org\r\nSubject: %s\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
       b"see attached\r\n--b\r\nContent-Type: application/octet-stream; name=invoice.pdf.exe\r\n\r\n"
       b"MZ\r\n--b--\r\n")  # fmt: skip


def would_headers(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    return [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-defang-would:")]  # fmt: skip


def test_a_rule_in_monitor_mode_lets_the_message_through_stamped_and_counted():
    settings = {"filter": {"monitor_rules": ["bad_filename"]}}
    with Stack(MODULAR, settings=settings) as stack:
        r = stack.send(EXE % b"monitored exe")
        assert r.data[0] == 250, r
        m = stack.arrived(b"monitored exe")
        entry = ("reject 554 5.7.1 Executable attachments are not accepted (invoice.pdf.exe) "
                 "(filter_part, part 2, rule bad_filename)")
        assert would_headers(m.raw) == [entry]
        assert b"name=invoice.pdf.exe\r\n\r\nMZ\r\n" in m.raw, "the message is otherwise unchanged"
        # the rule next to it still enforces
        r = stack.send(b"From: a@example.org\r\nSubject: =?euc-kr?B?x5GxuQ==?=\r\n\r\nhi\r\n")
        assert r.data[0] == 554 and "charset euc-kr" in r.data[1]
        status = stack.defang.status()
        assert status["would"] == {"reject": 1}
        assert status["tags"] == {"bad_filename:monitor": 1, "charset_block": 1}
        text = stack.defang.ctl("status").stdout
        assert "would:     reject 1 (monitor mode: not carried out)" in text


def test_monitor_mode_stamps_an_envelope_stage_refusal_on_the_message(tmp_path: Path):
    f = tmp_path / "filter.py"
    f.write_text("from defang import reject\n"
                 "def filter_sender(conn, sender):\n"
                 "    if sender.startswith('spammer@'):\n"
                 "        return reject('Sender blocked', '550', '5.7.1')\n")  # fmt: skip
    f.chmod(0o644)
    tmp_path.chmod(0o755)
    with Stack(f, settings={"filter": {"mode": "monitor"}}) as stack:
        spam = b"From: s@example.org\r\nSubject: from a spammer\r\n\r\nbuy\r\n"
        r = stack.send(spam, sender="spammer@example.org")
        assert r.data[0] == 250, r
        m = stack.arrived(b"from a spammer")
        assert would_headers(m.raw) == ["reject 550 5.7.1 Sender blocked (filter_sender)"]
        assert m.mail_from == "spammer@example.org"
        r = stack.send(b"From: a@example.org\r\nSubject: clean one\r\n\r\nhi\r\n")
        assert would_headers(stack.arrived(b"clean one").raw) == []
