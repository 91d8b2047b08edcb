"""Text a filter hands to defang, often copied from the message, is cleaned, never a
tempfail: tags, header names and values, reasons, file names of new parts, the
monitor notes stamped in a header (issue 25, items 4 and 8)."""

from __future__ import annotations

import email
import email.policy
import logging
import textwrap
from dataclasses import replace
from pathlib import Path

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.workers.api.decision import clean_tag

MESSAGE = (b"From: a@example.org\r\nSubject: =?utf-8?Q?line_one=0D=0ABcc:_victim@example.org?=\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--b\r\nContent-Type: message/partial; id=x; number=1\r\n"
           b'Content-Disposition: attachment; filename="=?utf-8?Q?a=0D=0Ab.exe?="\r\n\r\nX\r\n'
           b"--b--\r\n")  # fmt: skip


def trial(tmp_path: Path, code: str, raw: bytes = MESSAGE) -> dict:
    path = tmp_path / "filter.py"
    path.write_text(textwrap.dedent(code))
    t = Trial(replace(configmod.load(None, filter_path=str(path)), quarantine_dir=tmp_path / "q"))
    try:
        result = t.run(raw, Envelope(recipients=["bob@example.org"]))
    finally:
        t.close()
    assert result.error is None, result.error
    return {"outcome": result.outcome["action"], "actions": result.actions, "tags": result.tags,
            "would": result.would, "quarantine": result.quarantine}  # fmt: skip


def test_any_string_is_a_tag_cleaned_for_the_counters(tmp_path: Path) -> None:
    r = trial(tmp_path, """
        def filter_sender(conn, sender):
            conn.tag("from " + sender)
        def filter_part(msg, part):
            msg.tag(part.content_type)         # message/partial: a '/' in it
            msg.tag(part.filename or "")       # the sender's text, CR LF and all
            msg.tag("x" * 200)
        """)  # fmt: skip
    assert r["outcome"] == "continue"
    assert r["tags"] == ["from_sender_example.org", "text_plain", "_", "x" * 64, "message_partial",
                         "a_b.exe"]  # fmt: skip


def test_clean_tag() -> None:
    assert clean_tag("message/partial") == "message_partial"
    assert clean_tag("Win.Test.EICAR_HDB-1 (clamd)") == "Win.Test.EICAR_HDB-1_clamd_"
    assert clean_tag("évasion") == "_vasion" and clean_tag("") == "_"


def test_a_decoded_subject_with_cr_lf_is_added_as_a_folded_header(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, "defang.filter"):
        r = trial(tmp_path, """
            def filter_end(msg):
                msg.add_header("X-Original-Subject", msg.subject)
                msg.change_header("Subject", "[checked] " + msg.subject)
                msg.add_header("X-Virus Name", "Eicar")
            """)  # fmt: skip
    assert r["outcome"] == "continue"
    assert r["actions"] == [
        ["add_header", "X-Original-Subject", "line one\r\n Bcc: victim@example.org"],
        ["change_header", "Subject", "[checked] line one\r\n Bcc: victim@example.org", 1],
        ["add_header", "X-Virus-Name", "Eicar"],
    ]
    # the header stays one field: what a reader parses has no Bcc header
    head = b"".join(f"{a[1]}: {a[2]}\r\n".encode() for a in r["actions"]) + b"\r\nbody\r\n"
    parsed = email.message_from_bytes(head, policy=email.policy.default)
    assert parsed["Bcc"] is None and parsed["X-Original-Subject"] == "line one Bcc: victim@example.org"
    assert "has line breaks that are not folding" in caplog.text
    assert "header name 'X-Virus Name' is not a field name" in caplog.text


def test_reasons_file_names_and_monitor_notes_are_cleaned(tmp_path: Path) -> None:
    r = trial(tmp_path, """
        from defang import reject
        def filter_part(msg, part):
            if part.filename:
                msg.quarantine("file " + part.filename)
                part.replace("removed: " + part.filename, filename=part.filename + ".txt")
                msg.hold("held: " + part.filename)
        def filter_end(msg):
            msg.reject("two\\nlines " + msg.subject, monitor=True)
        """)  # fmt: skip
    assert r["outcome"] == "continue"
    assert r["quarantine"] == ["file a b.exe"]
    assert ["hold", "held: a b.exe"] in r["actions"]
    assert r["would"] == ["reject 550 5.7.1 two lines line one Bcc: victim@example.org (filter_end)"]
    assert ["add_header", "X-Defang-Would", r["would"][0]] in r["actions"]
