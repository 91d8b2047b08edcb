"""The worker's email policy remembers parsed headers and reads them as policy.default does."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from paths import CORPUS

from defang.workers.mime import mailpolicy

DEFAULT = BytesParser(policy=email.policy.default)
REMEMBERING = BytesParser(policy=mailpolicy.POLICY)


def view(path: Path, parser: BytesParser) -> list[object]:
    out: list[object] = []
    for part in parser.parsebytes(path.read_bytes()).walk():
        for name in dict.fromkeys(part.keys()):
            try:
                values = part.get_all(name)
                out.append((name, [(str(v), [type(d).__name__ for d in v.defects]) for v in values]))
            except Exception as exc:  # the same exception, with either policy
                out.append(repr(exc))
        try:
            out.append((part.get_content_type(), part.get_filename(), part.get_params(),
                        part.get_content_disposition(), part.get_content_charset()))  # fmt: skip
        except Exception as exc:  # the same exception, with either policy
            out.append(repr(exc))
    return out


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_every_corpus_header_reads_the_same_three_times_over() -> None:
    """Parsed, then from the message's table, then (a later message) from the kept one."""
    for path in sorted(CORPUS.glob("*.eml")):
        expected = view(path, DEFAULT)
        mailpolicy.next_message()
        assert view(path, REMEMBERING) == expected, path.name
        assert view(path, REMEMBERING) == expected, f"{path.name}, from the message's table"
        mailpolicy.next_message()
        assert view(path, REMEMBERING) == expected, f"{path.name}, kept across messages"
        mailpolicy.next_message()
        assert view(path, REMEMBERING) == expected, f"{path.name}, kept across messages"


def fetch(value: str) -> object:
    return mailpolicy.POLICY.header_fetch_parse("Content-Type", value)


def test_a_value_is_kept_once_a_later_message_has_it_too() -> None:
    mailpolicy.next_message()
    first = fetch("text/plain; charset=x-kept-test")
    fetch('multipart/mixed; boundary="only-in-one-message"')
    assert fetch("text/plain; charset=x-kept-test") is first  # within its message
    mailpolicy.next_message()
    second = fetch("text/plain; charset=x-kept-test")
    assert second is not first  # parsed again: it was not kept past its message
    mailpolicy.next_message()
    assert fetch("text/plain; charset=x-kept-test") is second  # kept: two messages had it
    held = [*mailpolicy._kept, *mailpolicy._this_message]
    assert ("Content-Type", 'multipart/mixed; boundary="only-in-one-message"') not in held


def test_the_tables_are_bounded(monkeypatch) -> None:
    for table in ("_kept", "_this_message", "_seen_before"):  # as a worker starts
        monkeypatch.setattr(mailpolicy, table, type(getattr(mailpolicy, table))())
    monkeypatch.setattr(mailpolicy, "CACHE_ENTRIES", 50)
    monkeypatch.setattr(mailpolicy, "SEEN_ENTRIES", 200)
    for i in range(1500):
        if i % 7 == 0:
            mailpolicy.next_message()
        name = f"file{i % 120}.txt"  # 120 values, each back every 17 messages
        assert fetch(f"text/plain; name={name}").params["name"] == name
        assert len(mailpolicy._kept) <= 50 and len(mailpolicy._this_message) <= 50
        assert len(mailpolicy._seen_before) <= 200
    assert mailpolicy._kept, "values that came back were kept"
    long_value = "text/plain; name=" + "x" * mailpolicy.CACHE_VALUE_CHARS
    for _ in range(3):
        mailpolicy.next_message()
        fetch(long_value)
    for table in (mailpolicy._kept, mailpolicy._this_message):
        assert all(len(value) <= mailpolicy.CACHE_VALUE_CHARS for _, value in table)


def test_boundaries_leave_no_patterns_in_re_cache(tmp_path) -> None:
    """The stdlib's feed parser compiles a pattern per boundary; a worker's does not
    (defang.workers.mime.boundarymatch), so nothing piles up in re's cache message after message."""
    import re

    from defang.workers.api import message as message_mod
    from defang.workers.api.conn import Connection

    def walk(i: int) -> None:
        path = tmp_path / f"m{i}.eml"
        path.write_bytes(b'Content-Type: multipart/mixed; boundary="b-%d"\r\n\r\n--b-%d\r\n'
                         b"Content-Type: text/plain\r\n\r\nhi\r\n--b-%d--\r\n" % (i, i, i))  # fmt: skip
        msg = message_mod.Message(Connection(), sender="a@example.org", recipients=["b@example.org"],
                                  queue_id="Q", path=str(path))  # fmt: skip
        assert len(msg.parts) == 2

    walk(0)
    before = dict(re._cache)
    for i in range(1, 100):
        walk(i)
    assert set(re._cache) <= set(before)
