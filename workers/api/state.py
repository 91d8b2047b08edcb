"""``defang.state``: memory that spans connections (and relays), for filters.

    from defang import state

    def filter_sender(conn, sender):
        if state.incr(f"senders:{sender}", ttl=3600) > 100:
            ...

Values with a TTL (``get``, ``set``, ``set_if_absent``, ``delete``), counters with
expiry (``incr``: increment-and-get, atomic), sets (``sadd``, ``srem``, ``smembers``,
``sismember``) and sliding windows (``hit``).  Every call takes ``timeout=`` (seconds;
``[state] timeout`` by default) and raises ``StateError`` when the back end (``[state]
backend``: SQLite on this host, or one Redis for several relays) did not answer; an
uncaught one is a filter error (``on_filter_error``, a 4xx).  Greylisting, rate limits and
the allow/block lists (``defang.greylist``, ``defang.ratelimit``, ``defang.lists``) catch it
themselves and answer ``[state] on_error``.  Keys starting with ``defang:`` are theirs.
docs/state.md has the whole API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from defang.core.verdicts import Verdict, tempfail
from defang.workers.api import services
from defang.workers.stores import state as stores
from defang.workers.stores.state import CURRENT, StateError, Store

__all__ = ["StateError", "delete", "get", "hit", "incr", "sadd", "set", "set_if_absent", "sismember",
           "smembers", "srem", "store", "unavailable"]  # fmt: skip

log = logging.getLogger("defang.filter")

#: ``[state] on_error = "tempfail"``: the sender retries later, nothing is lost
UNAVAILABLE = tempfail("Temporary local problem, please try again later", "451", "4.3.0")


def store() -> Store:
    """This worker's connection to the configured back end (opened on first use)."""
    settings = services.CURRENT.state
    if settings is not CURRENT.settings:
        CURRENT.configure(settings)
    return CURRENT.get()


def preload() -> None:
    """The back end's code imported before the workers are forked (``workers.warmup``)."""
    try:
        stores.preload(services.CURRENT.state)
    except (ImportError, StateError):  # the first call will say what is wrong
        pass


def unavailable(what: str, exc: StateError, queue_id: str | None = None) -> Verdict | None:
    """``[state] on_error`` for a check that could not reach the state: the tempfail, or
    None (the check is skipped) for ``"accept"``; one WARNING line either way."""
    action = services.CURRENT.state.on_error
    log.warning("%s: %s: state unavailable (%s): %s", queue_id or "-", what, exc, action)
    return UNAVAILABLE if action == "tempfail" else None


def get(key: str, *, timeout: float | None = None) -> str | None:
    """The value of ``key``; None when there is none or it expired."""
    return store().get(key, timeout=timeout)


def set(key: str, value: str, ttl: float | None = None, *, timeout: float | None = None) -> None:  # noqa: A001
    """Keep ``value`` under ``key`` for ``ttl`` seconds (None: until deleted)."""
    store().set(key, str(value), ttl, timeout=timeout)


def set_if_absent(key: str, value: str, ttl: float | None = None, *, timeout: float | None = None) -> bool:
    """Keep ``value`` only if ``key`` has none; True when this call set it (atomic: of
    several workers or relays asking at once, exactly one gets True)."""
    return store().set_if_absent(key, str(value), ttl, timeout=timeout)


def delete(key: str, *, timeout: float | None = None) -> None:
    store().delete(key, timeout=timeout)


def incr(key: str, amount: int = 1, ttl: float | None = None, *, timeout: float | None = None) -> int:
    """Add ``amount`` to the counter ``key`` and return the new value (atomic); a new
    counter starts at 0 and expires ``ttl`` seconds after it was made."""
    return store().incr(key, amount, ttl, timeout=timeout)


def sadd(key: str, members: Iterable[str], *, timeout: float | None = None) -> int:
    """Add members to the set ``key``; how many were new."""
    return store().sadd(key, [str(m) for m in members], timeout=timeout)


def srem(key: str, members: Iterable[str], *, timeout: float | None = None) -> int:
    """Remove members from the set ``key``; how many were there."""
    return store().srem(key, [str(m) for m in members], timeout=timeout)


def smembers(key: str, *, timeout: float | None = None) -> frozenset[str]:
    return frozenset(store().smembers(key, timeout=timeout))


def sismember(key: str, member: str, *, timeout: float | None = None) -> bool:
    return store().sismember(key, str(member), timeout=timeout)


def hit(key: str, window: float, limit: int, *, timeout: float | None = None) -> tuple[int, bool]:
    """One event in the sliding window ``key`` of ``window`` seconds: (the events in the
    window counting this one, whether it was under ``limit``).  An event over the limit is
    not kept, so a sender that waits gets through as the window slides."""
    return store().hit(key, window, limit, timeout=timeout)
