"""The feed parser's test for a multipart's delimiter lines, without a regex per boundary.

Why: for each multipart it reads, ``email.feedparser`` compiles a pattern from the
boundary.  Boundaries are made for one message, so ``re``'s cache never has it: each
compile runs ``re``'s parser and compiler, which are Python (~100 us), and touches their
objects, whose pages a forked worker then copies from the zygote (CPython 3.11 writes
reference counts): ~0.3 MB more in each worker on the benchmark's 140 KB mail.

How: ``install()`` gives the feed parser, in place of its ``re`` module, a stand-in whose
``compile()`` knows the one pattern the feed parser builds at run time -- the boundary
line's text, then an optional ``--``, blanks, an optional line end, and the end -- and
answers it with a matcher that tests the text with ``str.startswith`` and the rest with one
pattern compiled here once.  Any other pattern goes to ``re.compile``; so would the
boundary pattern of a Python release that wrote it differently (the feed parser then
works as before; tests/unit/test_boundary_match.py fails to say the saving is gone).

A match is ``re``'s match of the rest of the line: it has the groups the feed parser reads
(``end``, ``ws``, ``linesep``) but not ``sep``, and its span starts after the boundary.
"""

from __future__ import annotations

import email.feedparser
import re
from typing import Any

# what the feed parser puts around re.escape("--" + boundary)
_BEFORE = "(?P<sep>"
_AFTER = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_REST = re.compile(_AFTER[1:])  # the same groups, for the text after the boundary
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)  # re.escape puts a backslash before a character


class BoundaryMatcher:
    """``match(line)`` as the feed parser's compiled boundary pattern answers it."""

    __slots__ = ("delimiter",)

    def __init__(self, delimiter: str) -> None:
        self.delimiter = delimiter

    def match(self, line: str) -> re.Match[str] | None:
        if line.startswith(self.delimiter):
            return _REST.match(line, len(self.delimiter))
        return None


class _FeedParserRe:
    """What ``email.feedparser`` sees as ``re``: ``compile`` and ``escape``, nothing else used."""

    escape = staticmethod(re.escape)

    @staticmethod
    def compile(pattern: Any, flags: int = 0) -> Any:
        feedparsers = isinstance(pattern, str) and pattern.startswith(_BEFORE) and pattern.endswith(_AFTER)
        if feedparsers and not flags:
            return BoundaryMatcher(_ESCAPED.sub(r"\1", pattern[len(_BEFORE) : -len(_AFTER)]))
        return re.compile(pattern, flags)

    def __getattr__(self, name: str) -> Any:  # anything else the module may use one day
        return getattr(re, name)


def install() -> None:
    """Have ``email.feedparser`` (every parser in this process) use the matcher."""
    email.feedparser.re = _FeedParserRe()  # type: ignore[assignment]
