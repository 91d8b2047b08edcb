"""The worker's email policy remembers parsed headers and reads them as policy.default does."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from test_corpus_walk import CORPUS

from workers import mailpolicy

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
def test_every_corpus_header_reads_the_same_twice_over() -> None:
    for path in sorted(CORPUS.glob("*.eml")):
        expected = view(path, DEFAULT)
        assert view(path, REMEMBERING) == expected, path.name
        assert view(path, REMEMBERING) == expected, f"{path.name}, from the table"


def test_the_table_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(mailpolicy, "CACHE_ENTRIES", 50)
    policy = mailpolicy.POLICY
    for i in range(500):
        header = policy.header_fetch_parse("Content-Type", f"text/plain; name=file{i}.txt")
        assert header.params["name"] == f"file{i}.txt"
        assert len(mailpolicy._cache) <= 50
    long_value = "text/plain; name=" + "x" * mailpolicy.CACHE_VALUE_CHARS
    policy.header_fetch_parse("Content-Type", long_value)
    assert all(len(value) <= mailpolicy.CACHE_VALUE_CHARS for _, value in mailpolicy._cache)
