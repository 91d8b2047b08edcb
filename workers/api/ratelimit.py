"""``defang.ratelimit``: how many messages a client, user, sender or recipient may send.

    from defang import ratelimit

    def filter_sender(conn, sender):
        return ratelimit.check(conn, "auth_user", limit=100, window=3600)

A sliding window per key (``defang.state.hit``): the events of the last ``window``
seconds are counted, and an event over ``limit`` is refused (``action``: ``"tempfail"``
451 4.7.1, or ``"reject"`` 550 5.7.1) and not counted, so a sender that slows down gets
through as the window slides.  The window is shared wherever the state is (every relay
on Redis).  A refusal is logged with the counts (``rate limit auth_user=alice: 101 in
3600s > 100: tempfail``) and tagged ``ratelimit_<per>``.

``per`` names what is counted: ``client_ip`` (``conn.ip``), ``auth_user`` (the
``{auth_authen}`` macro: unauthenticated clients are not counted), ``sender``,
``recipient`` (pass ``sender=``/``recipient=``), or any name with ``key=`` given.
When the state cannot be reached: ``[state] on_error``.
"""

from __future__ import annotations

import logging
from typing import Any

from defang.core.verdicts import Verdict, reject, tempfail
from defang.workers.api import state
from defang.workers.stores.state import StateError

log = logging.getLogger("defang.filter")

PER = ("client_ip", "auth_user", "sender", "recipient")


def key_of(conn: Any, per: str, sender: str | None, recipient: str | None) -> str | None:
    """What ``per`` counts for this connection; None when there is nothing to count."""
    if per == "client_ip":
        return conn.ip or None
    if per == "auth_user":
        return conn.macros.get("{auth_authen}") or None
    if per == "sender":
        return sender.lower() if sender else None
    if per == "recipient":
        return recipient.lower() if recipient else None
    raise ValueError(f"ratelimit per={per!r}: expected one of {', '.join(PER)}, or key=")


def check(conn: Any, per: str, *, limit: int, window: float, action: str = "tempfail",
          sender: str | None = None, recipient: str | None = None, key: str | None = None,
          text: str | None = None) -> Verdict | None:  # fmt: skip
    """One more message for ``per``: None while under ``limit`` in ``window`` seconds, else
    the refusal (``action`` "tempfail" or "reject"; ``text`` replaces the default)."""
    if action not in ("tempfail", "reject"):
        raise ValueError(f"ratelimit action={action!r}: expected 'tempfail' or 'reject'")
    if limit < 1 or window <= 0:
        raise ValueError("ratelimit: limit must be >= 1 and window > 0")
    who = key if key is not None else key_of(conn, per, sender, recipient)
    if who is None:
        return None
    queue_id = conn.macros.get("i") or "-"
    try:
        count, allowed = state.hit(f"defang:rl:{per}:{window:g}:{who}", window, limit)
    except StateError as exc:
        return state.unavailable(f"rate limit {per}={who}", exc, queue_id)
    if allowed:
        log.debug("%s: rate limit %s=%s: %d in %gs <= %d", queue_id, per, who, count, window, limit)
        return None
    log.warning("%s: rate limit %s=%s: %d in %gs > %d: %s", queue_id, per, who, count, window, limit, action)
    if conn.decision is not None:
        conn.tag(f"ratelimit_{per}")
    if action == "reject":
        return reject(text or "Too many messages, refused", "550", "5.7.1")
    return tempfail(text or f"Too many messages, try again in {window:g} seconds", "451", "4.7.1")
