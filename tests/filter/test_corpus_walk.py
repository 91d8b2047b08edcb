"""Every real-world message in the shared corpus goes through every message hook.

The corpus is full of malformed MIME (see its README): the walk and the part
attributes must read all of it without an exception reaching the filter's verdict,
and every filename must be text a log line or a JSON reply can carry.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from paths import CORPUS, FILTERS
from wiretools import handle

from defang.core.verdicts import tempfail
from defang.core.wire import verdict_to_wire
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner

FILTER = FILTERS / "every_hook.py"
ON_ERROR = tempfail("Filter error", "451", "4.3.0")

_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_LINE = re.compile(rb"\r\n|\n")


def to_spool(raw: bytes) -> bytes:
    """The spool file the front end would write for ``raw``.

    As an MTA reads it: an mbox ``From `` line is not a header; the header section
    ends at the first empty line or at the first line that is neither a header nor a
    continuation (that line starts the body).  Header lines get CRLF; the body keeps
    its bytes as they are.
    """
    if raw.startswith(b"From "):
        raw = raw[_LINE.search(raw).end() :] if _LINE.search(raw) else b""
    lines: list[bytes] = []
    pos = 0
    while pos < len(raw):
        m = _LINE.search(raw, pos)
        end, nxt = (m.start(), m.end()) if m else (len(raw), len(raw))
        line = raw[pos:end]
        if line == b"":
            pos = nxt  # the empty line that ends the headers
            break
        if _HEADER_LINE.match(line) or (lines and line[:1] in (b" ", b"\t")):
            lines.append(line)
            pos = nxt
            continue
        break  # not a header: the body starts here
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + raw[pos:]


def _messages() -> list[Path]:
    return sorted(CORPUS.glob("*.eml")) if CORPUS.is_dir() else []


@pytest.fixture(scope="module")
def runner() -> FilterRunner:
    return FilterRunner(load_filter(str(FILTER)), on_filter_error=ON_ERROR)


def test_to_spool() -> None:
    assert to_spool(b"From x Mon\nA: 1\n b\n\nbody\n") == b"A: 1\r\n b\r\n\r\nbody\n"
    assert to_spool(b"A: 1\r\nno header\r\nrest") == b"A: 1\r\n\r\nno header\r\nrest"
    assert to_spool(b" first\nA: 1\n\nx") == b"\r\n first\nA: 1\n\nx"


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
@pytest.mark.parametrize("path", _messages(), ids=lambda p: p.name)
def test_corpus_message(path: Path, runner: FilterRunner, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.write_bytes(to_spool(path.read_bytes()))
    request = {
        "op": "eom",
        "conn": {
            "id": 1,
            "ip": "192.0.2.1",
            "hostname": "h",
            "port": 25,
            "helo": "h",
            "macros": {},
            "notes": {},
        },
        "sender": "a@example.com",
        "sender_args": [],
        "recipients": ["b@example.org"],
        "queue_id": path.stem,
        "spool": str(spool),
        "size": spool.stat().st_size,
    }
    reply = handle(runner, request)  # through the wire both ways
    assert "error" not in reply, reply.get("error")
    assert reply["verdict"] != verdict_to_wire(ON_ERROR)
    seen = runner.loaded.module.SEEN
    subject, header_count, _ = seen[0]
    assert isinstance(subject, str) and header_count >= 0
    parts = seen[1:]
    assert parts, "the walk saw no entity at all"
    assert reply["actions"] == [["add_header", "X-Parts", str(len(parts))]]
    for kind, content_type, filename, size, payload, charset, disposition, defects in parts:
        assert filename is None or isinstance(filename, str)
        if filename is not None:
            filename.encode("utf-8")  # no lone surrogates
        assert "/" in content_type and content_type == content_type.lower()
        assert size == len(payload) and isinstance(payload, bytes)
        assert charset is None or isinstance(charset, str)
        assert disposition in (None, "inline", "attachment")
        assert all(isinstance(d, str) for d in defects)
        if kind == "multipart":
            assert payload == b""
