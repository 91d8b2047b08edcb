"""The feed parser's boundary test without a compiled pattern per boundary: same answers."""

from __future__ import annotations

import email.feedparser
import email.policy
import random
import re
from email.parser import BytesParser

import pytest
from paths import CORPUS

from defang.workers.mime import boundarymatch


# the pattern email.feedparser compiles for a multipart (Lib/email/feedparser.py)
def feedparser_pattern(delimiter: str) -> str:
    return "(?P<sep>" + re.escape(delimiter) + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"


def answers(match: re.Match[str] | None) -> object:
    return None if match is None else (match.group("end"), match.group("ws"), match.group("linesep"))


def test_lines_match_as_with_the_compiled_pattern() -> None:
    rnd = random.Random(2046)
    pieces = ["--", "-", " ", "\t", "\r\n", "\n", "\r", "x", "=_", "?", "(", ")", "\\", ".", "*", "é", "\v"]
    compared = matched = 0
    for _ in range(300):
        delimiter = "--" + "".join(rnd.choice(pieces + ["b", "Q"]) for _ in range(rnd.randint(1, 8)))
        stand_in = boundarymatch._FeedParserRe.compile(feedparser_pattern(delimiter))
        assert isinstance(stand_in, boundarymatch.BoundaryMatcher), delimiter
        compiled = re.compile(feedparser_pattern(delimiter))
        for _ in range(40):
            line = rnd.choice(["", delimiter, delimiter[:-1]]) + "".join(
                rnd.choice(pieces) for _ in range(rnd.randint(0, 4))
            )
            compared += 1
            expected = answers(compiled.match(line))
            matched += expected is not None
            assert answers(stand_in.match(line)) == expected, (delimiter, line)
    assert matched > compared // 10  # the lines did test delimiters, not only non-matches


def test_other_patterns_are_compiled_by_re() -> None:
    stand_in = boundarymatch._FeedParserRe()
    assert isinstance(stand_in.compile(r"a+b"), re.Pattern)
    assert isinstance(stand_in.compile(feedparser_pattern("--x"), re.I), re.Pattern)
    assert stand_in.escape("a.b") == re.escape("a.b")


def test_the_installed_feedparser_uses_the_matcher(monkeypatch) -> None:
    """Fails when a Python release builds its boundary pattern another way (the saving is gone)."""
    boundarymatch.install()
    compiled: list[str] = []
    real = re.compile
    monkeypatch.setattr(boundarymatch.re, "compile", lambda p, f=0: compiled.append(p) or real(p, f))
    raw = (b'Content-Type: multipart/mixed; boundary="u-1 (x)"\n\n'
           b"--u-1 (x)\nContent-Type: text/plain\n\nhi\n--u-1 (x)--\n")  # fmt: skip
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert [p.get_content_type() for p in msg.walk()] == ["multipart/mixed", "text/plain"]
    assert msg.get_payload(0).get_payload() == "hi"
    assert compiled == []
    assert isinstance(email.feedparser.re, boundarymatch._FeedParserRe)


def structure(msg: object) -> list[object]:
    return [(p.get_content_type(), p.preamble, p.epilogue, [type(d).__name__ for d in p.defects],
             None if p.is_multipart() else p.get_payload()) for p in msg.walk()]  # fmt: skip


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_every_corpus_message_parses_as_with_re(monkeypatch) -> None:
    parser = BytesParser(policy=email.policy.compat32)
    for path in sorted(CORPUS.glob("*.eml")):
        raw = path.read_bytes()
        monkeypatch.setattr(email.feedparser, "re", re)
        expected = structure(parser.parsebytes(raw))
        boundarymatch.install()
        assert structure(parser.parsebytes(raw)) == expected, path.name
