"""The stdlib ``email`` policy the worker parses with: ``policy.default``, remembering.

Why: under ``policy.default`` every read of a header (``msg["Content-Type"]``, and
inside ``get_content_type()``, ``get_param()``, ``get_filename()``, and the parser's
own look at each part's type) runs the RFC 5322 header parser again, ~40 us a time.
A walk reads a part's Content-Type six times, and mail repeats the same few values
("text/plain; charset=utf-8") message after message.  So parsed headers are kept,
keyed by name and raw value, in bounded tables that each worker owns.

What is kept past its message is only what came back in a later one.  A parsed header
costs ~14 KB (its token tree), and some values never come back: a multipart's
Content-Type carries a boundary made for that one message.  Keeping every value cost a
worker 4 MB per 300 messages of the benchmark's 140 KB profile, and would have reached
~28 MB at the table's bound; kept this way, it stays at the values mail repeats.

Content-Type, Content-Disposition and Content-Transfer-Encoding values in their plain
form are not parsed at all until a filter reads a header's attributes
(``defang.workers.mime.deferredheaders``): what the feed parser and the walk read is the string.

Header objects are immutable strings with read-only attributes, so one object can be
handed out any number of times.  Behaviour is exactly ``policy.default``'s.
"""

from __future__ import annotations

from email.policy import EmailPolicy, linesep_splitter
from typing import Any

from defang.workers.mime.deferredheaders import deferred_header

CACHE_ENTRIES = 2048  # values kept across messages; the table is emptied when full
CACHE_VALUE_CHARS = 1024  # longer values are parsed every time, never kept
SEEN_ENTRIES = 1024  # values of earlier messages remembered (as hashes, ~140 B each) to know a repeat

_kept: dict[tuple[str, str], Any] = {}  # seen in more than one message
_this_message: dict[tuple[str, str], Any] = {}  # parsed for the message being read
_seen_before: set[int] = set()  # hashes of the keys of earlier messages


def next_message() -> None:
    """A new message is being read: what the last one parsed becomes "seen before"."""
    if len(_seen_before) + len(_this_message) > SEEN_ENTRIES:
        _seen_before.clear()
    _seen_before.update(map(hash, _this_message))
    _this_message.clear()


def forget() -> None:
    """Empty every table, as in a worker that has read nothing yet."""
    _kept.clear()
    _this_message.clear()
    _seen_before.clear()


class RememberingPolicy(EmailPolicy):
    """``policy.default``, with parsed header values reused (see the module docstring)."""

    def header_fetch_parse(self, name: str, value: Any) -> Any:
        if hasattr(value, "name") or len(value) > CACHE_VALUE_CHARS:
            return super().header_fetch_parse(name, value)
        key = (name, value)
        header = _kept.get(key)
        if header is None:
            header = _this_message.get(key)
        if header is not None:
            return header
        header = deferred_header(name, "".join(linesep_splitter.split(value)))
        if header is None:
            header = super().header_fetch_parse(name, value)
        if hash(key) in _seen_before:
            if len(_kept) >= CACHE_ENTRIES:
                _kept.clear()
            _kept[key] = header
        else:
            if len(_this_message) >= CACHE_ENTRIES:
                _this_message.clear()
            _this_message[key] = header
        return header


#: what ``msg.email`` and ``part.email`` are parsed with
POLICY = RememberingPolicy()
