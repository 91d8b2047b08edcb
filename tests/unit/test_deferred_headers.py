"""Deferred MIME headers read exactly as policy.default's, and the walk no longer parses them."""

from __future__ import annotations

import copy
import email.policy
import pickle
import random
from email.headerregistry import ContentTypeHeader
from email.parser import BytesParser

import pytest
from paths import CORPUS

from defang.workers.mime import mailpolicy
from defang.workers.mime.deferredheaders import deferred_header

NAMES = ("Content-Type", "Content-Disposition", "Content-Transfer-Encoding")
FACTORY = email.policy.default.header_factory


def reading(header: object) -> list[object]:
    """What a filter can read of a header: its string and every attribute."""
    out: list[object] = [str(header), header.name, [(type(d).__name__, str(d)) for d in header.defects]]
    for attr in ("params", "content_type", "maintype", "subtype", "content_disposition", "cte"):
        if hasattr(type(header), attr):
            value = getattr(header, attr)
            out.append((attr, dict(value) if attr == "params" else value))
    out.append(header.fold(policy=email.policy.default))
    return out


def same_as_stdlib(name: str, value: str) -> bool:
    """True when ``value`` was deferred; asserts it reads as the stdlib's header."""
    deferred = deferred_header(name, value)
    if deferred is None:
        return False
    expected = FACTORY(name, value)
    assert str(deferred) == str(expected), (name, value)  # before any parse
    assert isinstance(deferred, type(expected).__mro__[1])  # e.g. ContentTypeHeader
    assert reading(deferred) == reading(expected), (name, value)
    return True


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_every_corpus_value_reads_as_the_stdlibs() -> None:
    values = set()
    for path in sorted(CORPUS.glob("*.eml")):
        for part in BytesParser(policy=email.policy.compat32).parsebytes(path.read_bytes()).walk():
            for key, value in part.items():
                if key.lower() in {n.lower() for n in NAMES}:
                    values.add((key, "".join(str(value).splitlines())))
    deferred = sum(same_as_stdlib(name, value) for name, value in sorted(values))
    assert deferred > len(values) // 2, (deferred, len(values))  # most real values are plain


TOKEN_CHARS = "!#$%&'*+-.^_`{|}~" + "azAZ09"
QUOTED_CHARS = " !#$%&'()*+,-./:;<=>?@[]^_`{|}~az09"


def generated(rnd: random.Random) -> str:
    def token(chars: str = TOKEN_CHARS) -> str:
        return "".join(rnd.choice(chars) for _ in range(rnd.randint(1, 6)))

    def blank() -> str:
        return rnd.choice(["", "", " ", "\t", "  ", " \t"])

    value = token() + (("/" + token()) if rnd.random() < 0.7 else "") + blank()
    for _ in range(rnd.choice([0, 1, 1, 2, 3])):
        name = rnd.choice(["charset", "Name", "filename", "boundary", "FILENAME", "x-a", "n*", token()])
        quoted = "".join(rnd.choice(QUOTED_CHARS) for _ in range(rnd.randint(0, 8)))
        text = rnd.choice([token(), f'"{quoted}"'])
        value += ";" + blank() + name + blank() + "=" + blank() + text + blank()
    return value


def test_generated_values_read_as_the_stdlibs() -> None:
    rnd = random.Random(2045)
    deferred = 0
    for _ in range(4000):
        value = generated(rnd)
        for name in NAMES:
            deferred += same_as_stdlib(name, value)
    assert deferred > 2000


@pytest.mark.parametrize(
    "name, value",
    [
        ("Content-Type", "text/plain; charset*=utf-8''%e2%82%ac"),  # RFC 2231
        ("Content-Type", "text/plain; name=\"=?utf-8?q?a?=\""),  # encoded word
        ("Content-Type", "text/plain; charset=a; charset=b"),  # named twice: the stdlib drops one
        ("Content-Type", "text/plain; charset=a; CHARSET=b"),
        ("Content-Type", "text/plain (comment)"),
        ("Content-Type", "text"),  # no subtype: the stdlib reports and renders it
        ("Content-Type", "text/plain;"),
        ("Content-Type", 'text/plain; name="a\\"b"'),
        ("Content-Type", "text/plain; name=caf\xe9"),
        ("Content-Disposition", "attachment; filename=a b"),
        ("Content-Transfer-Encoding", "base64; x=y"),
        ("Subject", "hello"),
    ],
)
def test_what_is_not_plain_goes_to_the_stdlib(name: str, value: str) -> None:
    assert deferred_header(name, value) is None
    assert str(mailpolicy.POLICY.header_fetch_parse(name, value)) == str(FACTORY(name, value))


def test_a_copy_and_a_pickle_read_the_same() -> None:
    header = deferred_header("Content-Type", "multipart/mixed;boundary=abc")
    assert str(header) == 'multipart/mixed; boundary="abc"'
    for twin in (copy.copy(header), pickle.loads(pickle.dumps(header))):
        assert reading(twin) == reading(FACTORY("Content-Type", "multipart/mixed;boundary=abc"))


def test_the_walk_does_not_parse_a_plain_content_type(monkeypatch) -> None:
    """The point of deferring: reading a message's structure never runs the parser."""
    calls: list[str] = []
    real = ContentTypeHeader.value_parser
    monkeypatch.setattr(ContentTypeHeader, "value_parser", staticmethod(lambda v: calls.append(v) or real(v)))
    raw = (
        b"Content-Type: multipart/mixed; boundary=\"b-41\"\r\n\r\n--b-41\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n--b-41\r\n"
        b"Content-Type: application/octet-stream; name=\"a.exe\"\r\n"
        b"Content-Disposition: attachment; filename=\"a.exe\"\r\n\r\nMZ\r\n--b-41--\r\n"
    )
    mailpolicy.next_message()
    msg = BytesParser(policy=mailpolicy.POLICY).parsebytes(raw)
    seen = [(p.get_content_type(), p.get_filename(), p.get_content_charset()) for p in msg.walk()]
    assert msg.get_boundary() == "b-41"
    assert seen == [("multipart/mixed", None, None), ("text/plain", None, "utf-8"),
                    ("application/octet-stream", "a.exe", None)]  # fmt: skip
    assert calls == []
    assert msg["content-type"].params == {"boundary": "b-41"}  # an attribute: parsed now
    assert calls == ['multipart/mixed; boundary="b-41"']
