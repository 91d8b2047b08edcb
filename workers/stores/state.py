"""Shared state for filters: what a back end must do, its settings, and the per-process store.

Greylisting, rate limits and allow/block lists need memory that outlives one connection
and, on a fleet of relays, one host.  A back end keeps four kinds of entries, each with an
optional expiry (seconds; ``None`` = kept until deleted):

- values (``get``, ``set``, ``set_if_absent``, ``delete``);
- counters (``incr``: atomic increment-and-get, the expiry set when the counter is made);
- sets of strings (``sadd``, ``srem``, ``smembers``, ``sismember``, and ``sany``: the
  first of several candidates that is a member, in one round trip);
- sliding windows (``hit``: drop the events older than the window, and count one more
  only while under the limit, atomically: a client refused for being over the limit does
  not keep its own window full).

Two back ends: ``state_sqlite`` (one file, the default) and ``state_redis`` (one server for
several relays).  Every call takes ``timeout`` (``[state] timeout`` unless given) and raises
``StateError`` when the back end did not answer in time or cannot be reached: the caller
(``defang.workers.api.policy``) turns it into ``[state] on_error``.

Each worker process opens its own connection on first use (``store()``): a connection
made before a fork must not be shared by two processes (SQLite's locks are per process,
a Redis socket would interleave replies), so the store remembers the pid that made it.
Time is the wall clock (``time.time``): entries outlive restarts and are compared between
relays, which a monotonic clock cannot do; tests hand a store their own ``clock``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from defang.core.config import GreylistSection, StateSection
from defang.workers.stores.state_errors import Clock, Secs, StateError

__all__ = ["CURRENT", "Clock", "GreylistSettings", "PerProcess", "StateError", "StateSettings", "Store",
           "open_store"]  # fmt: skip


#: ``[state]`` as declared in defang.core.config: which back end, where, how long a call may
#: take, what a failure means (``cfg.section(StateSettings)``)
StateSettings = StateSection
#: ``[greylist]``: the defaults of ``defang.greylist.check`` (seconds)
GreylistSettings = GreylistSection
#: where a store not configured from a config file keeps its state (a filter run by hand)
UNCONFIGURED = StateSettings(path=Path("state.sqlite3"))


class Store(Protocol):
    """What every back end does (see the module's docstring)."""

    def get(self, key: str, *, timeout: Secs = None) -> str | None: ...
    def set(self, key: str, value: str, ttl: Secs = None, *, timeout: Secs = None) -> None: ...
    def set_if_absent(self, key: str, value: str, ttl: Secs = None, *,
                      timeout: Secs = None) -> bool: ...  # fmt: skip
    def delete(self, key: str, *, timeout: Secs = None) -> None: ...
    def incr(self, key: str, amount: int = 1, ttl: Secs = None, *, timeout: Secs = None) -> int: ...
    def sadd(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int: ...
    def srem(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int: ...
    def smembers(self, key: str, *, timeout: Secs = None) -> set[str]: ...
    def sismember(self, key: str, member: str, *, timeout: Secs = None) -> bool: ...
    def sany(self, key: str, members: list[str], *, timeout: Secs = None) -> str | None: ...
    def hit(self, key: str, window: float, limit: int, *, timeout: Secs = None) -> tuple[int, bool]: ...
    def close(self) -> None: ...


def open_store(settings: StateSettings, clock: Clock = time.time) -> Store:
    """A new connection to the configured back end (the module is imported only when used)."""
    if settings.backend == "redis":
        from defang.workers.stores.state_redis import RedisStore

        return RedisStore(settings.redis_url, settings.timeout, clock)
    from defang.workers.stores.state_sqlite import SqliteStore

    return SqliteStore(settings.path, settings.timeout, clock, settings.sweep_interval)


def preload(settings: StateSettings) -> None:
    """Import the configured back end's code now (in the zygote, before the workers are
    forked, so that they share it: redis-py is ~4 MB per process otherwise), connecting
    to nothing."""
    if settings.backend == "redis":
        from defang.workers.stores.state_redis import RedisStore

        RedisStore(settings.redis_url, settings.timeout, time.time).close()  # redis-py connects lazily
    else:
        from defang.workers.stores import state_sqlite  # noqa: F401


class PerProcess:
    """One store per process, opened on first use with the settings last given."""

    def __init__(self) -> None:
        self.settings = UNCONFIGURED
        self.clock: Clock = time.time
        self._store: Store | None = None
        self._pid = 0

    def configure(self, settings: StateSettings, clock: Clock | None = None) -> None:
        """New settings (a worker's config, a test's clock): the next call reconnects."""
        if settings != self.settings or clock is not None:
            self.close()
        self.settings = settings
        if clock is not None:
            self.clock = clock

    def get(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.settings, self.clock)  # a parent's connection is left alone
            self._pid = os.getpid()
        return self._store

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None


#: this process's store: the filter API's calls go through it
CURRENT = PerProcess()
