"""The stdlib ``email`` policy the worker parses with: ``policy.default``, remembering.

Why: under ``policy.default`` every read of a header (``msg["Content-Type"]``, and
inside ``get_content_type()``, ``get_param()``, ``get_filename()``, and the parser's
own look at each part's type) runs the RFC 5322 header parser again, ~40 us a time.
A walk reads a part's Content-Type six times, and mail repeats the same few values
("text/plain; charset=utf-8") message after message.  So parsed headers are kept,
keyed by name and raw value, in a bounded table that each worker owns.

Header objects are immutable strings with read-only attributes, so one object can be
handed out any number of times.  Behaviour is exactly ``policy.default``'s.
"""

from __future__ import annotations

from email.policy import EmailPolicy
from typing import Any

CACHE_ENTRIES = 2048  # the table is emptied when full (a flood of unique values)
CACHE_VALUE_CHARS = 1024  # longer values are parsed every time, never kept

_cache: dict[tuple[str, str], Any] = {}


class RememberingPolicy(EmailPolicy):
    """``policy.default``, with parsed header values reused (see the module docstring)."""

    def header_fetch_parse(self, name: str, value: Any) -> Any:
        if hasattr(value, "name") or len(value) > CACHE_VALUE_CHARS:
            return super().header_fetch_parse(name, value)
        key = (name, value)
        header = _cache.get(key)
        if header is None:
            header = super().header_fetch_parse(name, value)
            if len(_cache) >= CACHE_ENTRIES:
                _cache.clear()
            _cache[key] = header
        return header


#: what ``msg.email`` and ``part.email`` are parsed with
POLICY = RememberingPolicy()
