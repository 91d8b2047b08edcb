"""Splitting spooled MIME bytes exactly as the stdlib's feedparser splits them.

The rebuild (``defang.workers.mime.rebuild``) copies what nobody changed byte for byte
from the spool file; to find those bytes it needs where each entity's header section
ends and where each part of a multipart body lies, read the way the parser read them
(the same header-line and delimiter tests), or the copy would not be the part the
filter saw.  Pure functions over bytes and offsets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

CRLF = b"\r\n"
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")  # feedparser's headerRE
_EOL = re.compile(rb"\r\n|\r|\n")


def split_headers(buf: bytes, start: int, end: int) -> int:
    """Offset where the body of the entity in ``buf[start:end]`` starts.

    As the feedparser reads it: header lines are those that look like a field or a
    continuation; an empty line ends them (and is not part of the body); any other
    line ends them and starts the body.
    """
    pos = start
    while pos < end:
        m = _EOL.search(buf, pos, end)
        line_end = m.start() if m else end
        if line_end == pos:  # an empty line: the separator
            return m.end() if m else end
        if not _HEADER_LINE.match(buf, pos, line_end):
            return pos
        pos = m.end() if m else end
    return end


class Layout:
    """Where the parts of one multipart body lie in the spooled bytes.

    ``segments``: (delimiter start, part start, part end, segment end) per part;
    the bytes from part end to segment end are the line end that belongs to the
    next delimiter.  ``tail``: start of the close delimiter (the close delimiter
    and the epilogue run to the end), or None when it is missing.
    """

    __slots__ = ("segments", "tail")

    def __init__(self, segments: list[tuple[int, int, int, int]], tail: int | None) -> None:
        self.segments = segments
        self.tail = tail


def _eol_before(buf: bytes, pos: int, floor: int) -> int:
    if pos - 2 >= floor and buf[pos - 2 : pos] == CRLF:
        return 2
    if pos - 1 >= floor and buf[pos - 1 : pos] in (b"\r", b"\n"):
        return 1
    return 0


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")


def _delimiters(buf: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """(line start, line end, is close) of each delimiter line in ``buf[start:end]``.

    The feedparser's test: a line that is ``--boundary``, optionally ``--``, then
    blanks.  Found with ``bytes.find`` on the literal (a regex with a look-behind
    first would scan a 5 MB body a hundred times slower).
    """
    needle = b"--" + boundary
    pos = start
    while (i := buf.find(needle, pos, end)) >= 0:
        if i == 0 or buf[i - 1] in (10, 13):  # at the start of a line
            m = _DELIMITER_TAIL.match(buf, i + len(needle), end)
            if m:
                yield i, m.end(), m.group(1) is not None
        pos = i + 1


def split_multipart(buf: bytes, start: int, end: int, boundary: bytes) -> Layout | None:
    """The parts of the multipart body ``buf[start:end]``; None without a start delimiter."""
    segments: list[tuple[int, int, int, int]] = []
    seg_start = part_start = -1
    for line_start, line_end, close in _delimiters(buf, start, end, boundary):
        if seg_start < 0:  # still in the preamble
            if close:
                return None  # a close delimiter before any delimiter: the stdlib sees no parts
            seg_start, part_start = line_start, line_end
            continue
        if line_start == part_start:  # repeated delimiter lines are one delimiter
            part_start = line_end
            continue
        part_end = line_start - _eol_before(buf, line_start, part_start)
        segments.append((seg_start, part_start, part_end, line_start))
        if close:
            return Layout(segments, line_start)
        seg_start, part_start = line_start, line_end
    if seg_start < 0:
        return None
    trailing = _eol_before(buf, end, part_start) if end > part_start else 0
    segments.append((seg_start, part_start, end - trailing, end))
    return Layout(segments, None)
