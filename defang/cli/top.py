"""``defangctl top``: the status each second, as a live screen (curses), until ``q``.

Each refresh is one ``status`` request on the control socket, like ``defangctl status``:
rates by verdict come from two replies a refresh apart, the rest is the reply as it is
(``ctlview.top`` lays it out).  A multiplexor that goes away is a line on the screen,
and the view keeps asking.
"""

from __future__ import annotations

import curses
import os
import time
from collections.abc import Callable
from typing import Any

from defang.cli import ctlview
from defang.core import wire

REFRESH = 1.0


def run(ask: Callable[[], Any]) -> int:
    """Until ``q`` (or Ctrl-C): ``ask()`` returns a status reply or raises OSError."""
    # the window's size as it is (and as it changes), not $LINES/$COLUMNS from some start
    os.environ.pop("LINES", None)
    os.environ.pop("COLUMNS", None)
    try:
        curses.wrapper(_loop, ask)
    except KeyboardInterrupt:
        pass
    return 0


def _loop(screen: Any, ask: Callable[[], Any]) -> None:
    curses.curs_set(0)
    screen.timeout(100)  # getch waits at most 0.1 s: q is answered at once
    prev: dict[str, Any] | None = None
    prev_at = 0.0
    while True:
        at = time.monotonic()
        try:
            cur = wire.to_wire(ask())
            lines = ctlview.top(cur, prev, at - prev_at if prev else 0.0)
            prev, prev_at = cur, at
        except (OSError, wire.ProtocolError) as exc:
            lines = [f"defang top: cannot reach the multiplexor: {exc}; trying again each second", "",
                     "q quits"]  # fmt: skip
            prev = None
        _draw(screen, lines)
        while time.monotonic() - at < REFRESH:
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return


def _draw(screen: Any, lines: list[str]) -> None:
    screen.erase()
    height, width = screen.getmaxyx()
    for y, line in enumerate(lines[: height]):
        try:
            screen.addnstr(y, 0, line, width - 1)
        except curses.error:  # the bottom-right cell: curses cannot move past it
            pass
    screen.refresh()
