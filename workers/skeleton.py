"""Parse a message's structure without feeding its big bodies to the stdlib parser.

Why: the stdlib ``email`` feed parser handles every line in Python.  A 7 MB base64
attachment is ~95,000 lines and ~100 ms of a worker's CPU (and tens of MB of line
objects) before a filter has read a single header -- for a walk that only wants each
part's Content-Type and filename.

How: long runs of body lines are replaced, before parsing, by one stand-in line each
(a *token*), and read back from the spool file only when something reads that text
(``Spans.restore``, ``Spans.materialize``).  The structure the parser builds is the
same as from the whole file, because the runs replaced are ones the feed parser cannot
tell from any other line:

* no line of a run starts with ``-`` (so none can be a MIME delimiter of any
  enclosing multipart) and none is empty (so none ends a header section, or a block of
  ``message/delivery-status``);
* a run's first line does not look like a header field (``Name:``, ``From ``, a
  continuation) -- so if the parser is reading a header section when it meets the run,
  the run ends that section exactly as the token does;
* runs are whole lines, with no bare CR (the parser's third kind of line end, which
  the search for the lines above does not see).

Every other line after the first of a run is then, for the parser, just body text
appended to whatever it is collecting (a leaf's payload, a preamble, an epilogue); the
token lands in the same string, and restoring it gives the text the parser would have
built.  The text is what ``BytesParser.parse`` on the file gives: line ends read as
LF (the stdlib reads a file in universal-newline mode).

Tokens start with DEL (0x7f), which no header name, delimiter or continuation can start
with, and carry a tag drawn at random for each message (48 bits): text in a message
that looks like a token (another message's, say) is never taken for one of its own.
Small messages are parsed whole: below ``MIN_RUN`` there is nothing to save.
"""

from __future__ import annotations

import io
import os
import re
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import BinaryIO

#: runs shorter than this are left to the parser (the token costs more than it saves)
MIN_RUN = 16 * 1024
_PREFIX = b"\x7fdefang-span-"
# a line that starts with "-" or is empty: the lines a run may not contain
_STOP_LINE = re.compile(rb"\n(?=-|\r?\n)")
# the stdlib feed parser's headerRE, for bytes
_BARE_CR = re.compile(rb"\r(?!\n)")  # a line end to the parser, unseen by _STOP_LINE
_HEADER_LIKE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_MAX_SKIPPED_LINES = 64  # header-like lines skipped at the start of one run


class Spans:
    """The runs cut out of one spool file, and how to put them back."""

    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag
        # token number -> [start, end] of the run in the file (without its last line end)
        self.runs: list[tuple[int, int]] = []
        self._lengths: dict[int, int] = {}
        self._token = re.compile(re.escape(tag) + r"(\d+)\x7f")
        self._done: set[int] = set()

    def __len__(self) -> int:
        return len(self.runs)

    def has_tokens(self, text: str) -> bool:
        return self.tag in text

    def restore(self, text: str) -> str:
        """``text`` with every token replaced by the run it stands for, read from the file."""
        if self.tag not in text:
            return text
        with open(self.path, "rb") as f:

            def read(m: re.Match[str]) -> str:
                start, end = self.runs[int(m.group(1))]
                f.seek(start)
                data = f.read(end - start)
                # a run has no bare CR: deleting every CR turns CRLF into LF (and fast)
                return data.translate(None, b"\r").decode("ascii", "surrogateescape")

            return self._token.sub(read, text)

    def length(self, text: str) -> int:
        """``len(self.restore(text))`` without reading the file."""
        if self.tag not in text:
            return len(text)
        size = len(text)
        for m in self._token.finditer(text):
            size += self._length(int(m.group(1))) - len(m.group(0))
        return size

    def _length(self, number: int) -> int:
        if number not in self._lengths:
            start, end = self.runs[number]
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            self._lengths[number] = len(data) - data.count(b"\r")
        return self._lengths[number]

    def materialize(self, entity: EmailMessage) -> EmailMessage:
        """Put the real text back into ``entity`` and everything inside it (once)."""
        stack = [entity]
        while stack:
            node = stack.pop()
            if id(node) in self._done:
                continue
            self._done.add(id(node))
            payload = node._payload
            if isinstance(payload, str):
                if self.tag in payload:
                    node._payload = self.restore(payload)
            elif isinstance(payload, list):
                stack.extend(p for p in payload if isinstance(p, EmailMessage))
            for attr in ("preamble", "epilogue"):
                value = getattr(node, attr, None)
                if isinstance(value, str) and self.tag in value:
                    setattr(node, attr, self.restore(value))
        return entity


def reduce(data: bytes, path: str, min_run: int | None = None) -> tuple[bytes, Spans] | None:
    """``data`` with its long runs of body lines replaced by tokens; None if none was."""
    min_run = MIN_RUN if min_run is None else min_run
    if len(data) < 2 * min_run:
        return None
    spans = Spans(path, (_PREFIX + os.urandom(6).hex().encode() + b".").decode("ascii"))
    tag = spans.tag.encode("ascii")
    pieces: list[bytes] = []
    copied = 0  # data[:copied] is in pieces
    # where the lines after the last stop line start; never the file's first line, which
    # _STOP_LINE cannot see (it may be the empty line of a message without headers)
    line_start = data.find(b"\n") + 1
    stops = [m.start() for m in _STOP_LINE.finditer(data)]
    stops.append(data.rfind(b"\n"))  # the last run ends at the last line end
    for next_stop in stops:
        # candidate run: from line_start up to and with the line end at next_stop
        start = _first_body_line(data, line_start, next_stop)
        # the next candidate starts after the stop line that follows next_stop
        line_start = data.find(b"\n", next_stop + 1) + 1 or len(data)
        if start < 0 or next_stop - start < min_run or _BARE_CR.search(data, start, next_stop + 1):
            continue
        end = next_stop - 1 if data[next_stop - 1 : next_stop] == b"\r" else next_stop
        eol = data[end : next_stop + 1]
        number = len(spans.runs)
        spans.runs.append((start, end))
        pieces += (data[copied:start], tag, str(number).encode("ascii"), b"\x7f", eol)
        copied = next_stop + 1
    if not spans.runs:
        return None
    pieces.append(data[copied:])
    return b"".join(pieces), spans


def _first_body_line(data: bytes, start: int, end: int) -> int:
    """The first line in data[start:end] that does not look like a header field, or -1."""
    for _ in range(_MAX_SKIPPED_LINES):
        if start >= end:
            return -1
        if not _HEADER_LIKE.match(data, start):
            return start
        start = data.find(b"\n", start, end) + 1
        if start == 0:
            return -1
    return -1


def parse(
    f: BinaryIO, path: str, parser: BytesParser, min_run: int | None = None
) -> tuple[EmailMessage, Spans | None]:
    """The message in ``f`` (the file at ``path``) parsed by ``parser``, long runs as tokens."""
    data = f.read()
    reduced = reduce(data, path, min_run)
    if reduced is None:
        return parser.parse(io.BytesIO(data)), None
    del data
    text, spans = reduced
    return parser.parse(io.BytesIO(text)), spans
