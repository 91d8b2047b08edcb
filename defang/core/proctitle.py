"""Process titles (``ps`` shows what each defang process is doing)."""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - setproctitle is a hard dependency
    _set = None


def set_title(title: str) -> None:
    """Set the title ``ps`` shows.  A title carries text from the MTA (a queue ID, and
    through it what a client sent), which may hold lone surrogates from bytes that were not
    UTF-8: setproctitle cannot encode those and raises, so they are shown escaped."""
    if _set is not None:
        _set(title.encode("utf-8", "backslashreplace").decode("utf-8"))
