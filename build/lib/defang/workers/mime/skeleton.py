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
Small messages are parsed whole: below ``MIN_RUN`` there is nothing to save.  A big one
is scanned ``CHUNK`` bytes at a time, so a worker never holds the whole file.
"""

from __future__ import annotations

import bisect
import io
import os
import re
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import BinaryIO

from defang.core.malloc import MMAP_THRESHOLD
from defang.workers.mime import boundarymatch

boundarymatch.install()  # the feed parser, which parses here, tests boundaries without a regex each

#: runs shorter than this are left to the parser (the token costs more than it saves)
MIN_RUN = 16 * 1024
_PREFIX = b"\x7fdefang-span-"
# a token: the prefix, the message's tag, the run's number (one pattern for every tag:
# compiling one per message cost 80 us, a sixth of a 140 KB message's walk)
_TOKEN = re.compile(r"\x7fdefang-span-([0-9a-f]{12}\.)(\d+)\x7f")
# a line end before a line that starts with "-" or is empty: the lines a run may not contain
_STOP_LINE = re.compile(rb"\n(?=-|\r?\n)")
_BARE_CR = re.compile(rb"\r(?!\n)")  # a line end to the parser, unseen by _STOP_LINE
# the stdlib feed parser's headerRE, for bytes
_HEADER_LIKE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_MAX_SKIPPED_LINES = 64  # header-like lines skipped at the start of one run


class Spans:
    """The runs cut out of one spool file, and how to put them back."""

    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag
        # token number -> (start, end) of the run in the file (without its last line end),
        # and the length of its text (CRLF read as LF)
        self.runs: list[tuple[int, int, int]] = []
        self._own = tag.removeprefix(_PREFIX.decode("ascii"))  # what _TOKEN's first group is for ours
        self._done: set[int] = set()

    def __len__(self) -> int:
        return len(self.runs)

    def restore(self, text: str) -> str:
        """``text`` with every token replaced by the run it stands for, read from the file."""
        if self.tag not in text:
            return text
        with open(self.path, "rb") as f:

            def read(m: re.Match[str]) -> str:
                if m.group(1) != self._own:
                    return m.group(0)
                start, end, _ = self.runs[int(m.group(2))]
                f.seek(start)
                data = f.read(end - start)
                # a run has no bare CR: deleting every CR turns CRLF into LF (and fast)
                return data.translate(None, b"\r").decode("ascii", "surrogateescape")

            return _TOKEN.sub(read, text)

    def length(self, text: str) -> int:
        """``len(self.restore(text))`` without reading the file."""
        if self.tag not in text:
            return len(text)
        size = len(text)
        for m in _TOKEN.finditer(text):
            if m.group(1) == self._own:
                size += self.runs[int(m.group(2))][2] - len(m.group(0))
        return size

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


#: the file is scanned this much at a time: a worker never holds a whole big message.
#: Each chunk read, and each chunk joined to the bytes carried over, is a new object:
#: under the workers' fixed mmap threshold they come from the heap and reuse its pages;
#: at 256 KiB each was a fresh mapping, 3,473 page faults per 7 MB message and twice
#: the scan's CPU (measured: 20-24 against 9-12 ms).
CHUNK = MMAP_THRESHOLD // 2
_WINDOW = 64 * 1024  # what is read at a run's start to find its first body line


#: bytes read with the regexes before a block of equal lines is looked for again
_REGEX_STEP = 8 * 1024
#: a block of equal lines shorter than this is left to the regexes
_BLOCK_MIN = 4 * 1024
_FIRST_PIECE_LINES = 64  # lines in the first piece of a block checked; each next piece doubles
_PIECE_MAX = 128 * 1024  # bytes in a piece at most: its passes read it from the CPU cache


class _Scan:
    """What one pass over the file finds (offsets in the file).

    ``stops``: the line ends before each stop line, then the last line end of the file;
    ``crs``: how many CRs the file has before each of them; ``crlf``: whether a CR
    precedes each; ``bare_crs``: where the bare CRs are.

    Two ways to read a stretch of the file, with the same findings.  The regexes visit
    every line end in Python's matcher.  A *block* -- lines of one length, such as
    base64's 76 characters -- is checked by a few passes at C speed instead: the bytes
    where its line ends should be, the first byte of each line, counts of its LFs and
    CRs.  (Measured on the benchmark's 7 MB message: 11.3 ms by regexes, 5.1 ms with
    blocks.)  A block is checked a piece at a time, each twice the last (up to
    _PIECE_MAX), so a stretch that turns out not to be one costs no more than the part
    of it that was.
    """

    def __init__(self) -> None:
        self.stops: list[int] = []
        self.crs: list[int] = []
        self.crlf: list[bool] = []
        self.bare_crs: list[int] = []
        self.first_eol = -1
        self.first_crs = 0
        self.size = 0
        # within the chunk being read: its file offset, the CRs before `counted`
        self._base = 0
        self._crs = 0
        self._counted = 0
        self._prev_byte = -1  # the file's byte before the chunk
        self._open_block = False  # the last chunk ended in a block, which may go on
        self._last: tuple[int, int, bool] | None = None  # last line end seen, its crs, crlf

    def chunk(self, buf: bytes, limit: int) -> None:
        """Find what buf[:limit] holds (buf has up to 2 bytes more, to look ahead into)."""
        self._counted = 0
        if self.first_eol < 0:
            first = buf.find(b"\n", 0, limit)
            if first >= 0:
                self.first_eol = self._base + first
                self.first_crs = self._crs + buf.count(b"\r", 0, first)
        pos = 0
        # regexes up to a line start, then a block from there if there is one; a block
        # that ran to the end of the last chunk is looked for again at the first line start
        step = 0 if self._open_block else _REGEX_STEP
        self._open_block = False
        while pos < limit:
            line_start = buf.find(b"\n", min(pos + step, limit), limit) + 1 or limit
            step = _REGEX_STEP
            self._regexes(buf, pos, line_start)
            pos = line_start
            if pos < limit:
                pos = self._block(buf, pos, limit)
        eol = buf.rfind(b"\n", 0, limit)
        if eol >= 0:
            crlf = (buf[eol - 1] if eol else self._prev_byte) == 13
            self._last = (self._base + eol, self._crs + buf.count(b"\r", self._counted, eol), crlf)
        self._crs += buf.count(b"\r", self._counted, limit)
        if limit:
            self._prev_byte = buf[limit - 1]
        self._base += limit

    def finish(self) -> _Scan:
        """The scan once every chunk is in: the file's last line end goes with the stops."""
        self.size = self._base
        if self._last is not None:
            self.stops.append(self._last[0])
            self.crs.append(self._last[1])
            self.crlf.append(self._last[2])
        return self

    def _regexes(self, buf: bytes, start: int, end: int) -> None:
        """The stop lines and bare CRs at positions start..end-1 (the regexes look past end)."""
        # the regexes look 2 bytes past a line end: let them, but no further
        for m in _STOP_LINE.finditer(buf, start, end + 2):
            p = m.start()
            if p >= end:
                break
            self._stop(buf, p)
        for m in _BARE_CR.finditer(buf, start, end + 2):
            if m.start() >= end:
                break
            self.bare_crs.append(self._base + m.start())

    def _stop(self, buf: bytes, p: int) -> None:
        self._crs += buf.count(b"\r", self._counted, p)
        self._counted = p
        self.stops.append(self._base + p)
        self.crs.append(self._crs)
        self.crlf.append((buf[p - 1] if p else self._prev_byte) == 13)

    def _block(self, buf: bytes, start: int, limit: int) -> int:
        """Past the block of equal lines at ``start`` (a line start), if one is there.

        Returns the position of the block's last LF, where the regexes go on: whether
        the line after it is a stop line is theirs to say.  No block: ``start``.
        """
        eol = buf.find(b"\n", start, limit)
        width = eol + 1 - start
        if eol < 0 or width < 3:
            return start
        cr = 1 if buf[eol - 1] == 13 else 0
        end = start  # lines checked so far: buf[start:end]
        lines = _FIRST_PIECE_LINES
        while True:
            n = min(lines, (limit - end) // width)
            if n == 0:
                break
            stop = end + n * width
            if not (
                buf.count(b"\n", end, stop) == n
                and buf[end + width - 1 : stop : width].count(b"\n") == n  # each line's LF
                and buf.count(b"\r", end, stop) == cr * n
                and (not cr or buf[end + width - 2 : stop : width].count(b"\r") == n)
                and b"-" not in buf[end:stop:width]  # each line's first byte
            ):
                break
            end = stop
            lines = min(lines * 2, _PIECE_MAX // width)
        if end - start < _BLOCK_MIN:
            return start
        self._open_block = limit - end < width  # it ran to the chunk's end, not to a line unlike it
        # no stop line and no bare CR in the block: only its CRs to add to the count
        self._crs += buf.count(b"\r", self._counted, start) + cr * ((end - start) // width)
        self._counted = end
        return end - 1


def _scan(f: BinaryIO, chunk_size: int) -> _Scan:
    """One pass over ``f``, ``chunk_size`` bytes at a time (the last 2 kept for lookahead)."""
    scan = _Scan()
    buf = b""
    while True:
        chunk = f.read(chunk_size)
        buf += chunk
        eof = not chunk
        limit = len(buf) if eof else max(0, len(buf) - 2)
        scan.chunk(buf, limit)
        buf = buf[limit:]
        if eof:
            return scan.finish()


def _pread(f: BinaryIO, start: int, size: int) -> bytes:
    f.seek(start)
    return f.read(size)


def reduce(
    f: BinaryIO, path: str, min_run: int | None = None, chunk_size: int | None = None
) -> tuple[bytes, Spans] | None:
    """The message in ``f`` with its long runs of body lines replaced by tokens, read a
    chunk at a time; None if no run was replaced."""
    min_run = MIN_RUN if min_run is None else min_run
    if os.fstat(f.fileno()).st_size < 2 * min_run:
        return None  # nothing worth a scan
    scan = _scan(f, chunk_size or CHUNK)
    if scan.size < 2 * min_run or scan.first_eol < 0:
        return None
    spans = Spans(path, (_PREFIX + os.urandom(6).hex().encode() + b".").decode("ascii"))
    tag = spans.tag.encode("ascii")
    pieces: list[bytes] = []
    copied = 0  # the file up to here is in pieces
    # the candidate run after the line end at `prev`: never the file's first line, which
    # _STOP_LINE cannot see (it may be the empty line of a message without headers)
    prev, prev_crs, after_stop_line = scan.first_eol, scan.first_crs, False
    for next_stop, next_crs, crlf in zip(scan.stops, scan.crs, scan.crlf, strict=True):
        here, here_crs, skip = prev, prev_crs, after_stop_line
        prev, prev_crs, after_stop_line = next_stop, next_crs, True
        if next_stop - here < min_run:
            continue
        window = _pread(f, here + 1, _WINDOW)
        offset = window.find(b"\n") + 1 if skip else 0  # past the stop line
        start = _first_body_line(window, offset, len(window)) if offset or not skip else -1
        if start < 0:
            continue
        run_start = here + 1 + start
        if next_stop - run_start < min_run:
            continue
        i = bisect.bisect_left(scan.bare_crs, run_start)
        if i < len(scan.bare_crs) and scan.bare_crs[i] <= next_stop:
            continue
        end = next_stop - 1 if crlf else next_stop
        # CRs in the run's text: those before next_stop, less those before the run, less
        # the CR of the run's last line end (not part of its text)
        crs_in_text = next_crs - here_crs - window.count(b"\r", 0, start) - crlf
        text_length = (end - run_start) - crs_in_text
        number = len(spans.runs)
        spans.runs.append((run_start, end, text_length))
        pieces += (_pread(f, copied, run_start - copied), tag, str(number).encode("ascii"), b"\x7f",
                   b"\r\n" if crlf else b"\n")  # fmt: skip
        copied = next_stop + 1
    if not spans.runs:
        return None
    pieces.append(_pread(f, copied, scan.size - copied))
    return b"".join(pieces), spans


def _first_body_line(data: bytes, start: int, end: int) -> int:
    """The first whole line in data[start:end] that does not look like a header field, or -1."""
    for _ in range(_MAX_SKIPPED_LINES):
        line_end = data.find(b"\n", start, end)
        if line_end < 0:
            return -1  # not a whole line here: cannot tell
        if not _HEADER_LIKE.match(data, start, line_end):
            return start
        start = line_end + 1
    return -1


def parse(
    f: BinaryIO, path: str, parser: BytesParser, min_run: int | None = None
) -> tuple[EmailMessage, Spans | None]:
    """The message in ``f`` (the file at ``path``) parsed by ``parser``, long runs as tokens."""
    reduced = reduce(f, path, min_run)
    if reduced is None:
        f.seek(0)
        return parser.parse(f), None
    text, spans = reduced
    return parser.parse(io.BytesIO(text)), spans
