"""The Redis back end of the shared state: one server for several relays (redis-py).

- One connection per worker (a pool of one; the store is per process,
  ``defang.workers.stores.state.PerProcess``), opened when first used, reopened by
  redis-py on the next call after a failure: when Redis is back, the next message uses it.
- Timeouts: connecting and every reply wait at most the call's timeout; redis-py's own
  retries are off, so a dead server costs one timeout per call, not several.  A call with
  a timeout other than ``[state] timeout`` uses a connection of its own for that value.
- Atomic where it must be: increment-and-set-expiry and the sliding window are Lua
  scripts (one round trip, nothing in between); set-if-absent is ``SET NX PX``.
- Expiry is Redis's own (``PX``): nothing to sweep.  Sliding windows are sorted sets
  scored by the relay's clock, which must agree between relays (NTP).

Any failure is a ``StateError`` naming the server.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from defang.workers.stores.state_errors import Clock, Secs, StateError

T = TypeVar("T")

INCR = """
local new = redis.call('EXISTS', KEYS[1]) == 0
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if new and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""

HIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[3]) then return {count + 1, 0} end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ARGV[2] * 1000))
return {count + 1, 1}
"""


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, int(ttl * 1000))


class RedisStore:
    """One connection to the state server (see the module's docstring)."""

    def __init__(self, url: str, timeout: float, clock: Clock) -> None:
        self.url = url
        self.timeout = timeout
        self.clock = clock
        self._clients: dict[float, redis.Redis] = {}
        self._serial = itertools.count()
        self._where = url.partition("://")[2].rpartition("@")[2] or url  # never the password in a message
        client = self._client(None)
        self._incr = client.register_script(INCR)
        self._hit = client.register_script(HIT)

    def _client(self, timeout: float | None) -> redis.Redis:
        t = self.timeout if timeout is None else timeout
        client = self._clients.get(t)
        if client is None:
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=t, socket_connect_timeout=t,
                                              retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                              max_connections=1, decode_responses=True)  # fmt: skip
            except (ValueError, redis.RedisError) as exc:
                raise StateError(f"redis {self._where}: {exc}") from None
            self._clients[t] = client
        return client

    def _call(self, timeout: float | None, fn: Callable[[redis.Redis], T]) -> T:
        try:
            return fn(self._client(timeout))
        except (redis.RedisError, OSError) as exc:
            raise StateError(f"redis {self._where}: {type(exc).__name__}: {exc}") from None

    def get(self, key: str, *, timeout: Secs = None) -> str | None:
        return self._call(timeout, lambda r: r.get(key))

    def set(self, key: str, value: str, ttl: Secs = None, *, timeout: Secs = None) -> None:
        self._call(timeout, lambda r: r.set(key, value, px=_ms(ttl)))

    def set_if_absent(self, key: str, value: str, ttl: Secs = None, *,
                      timeout: Secs = None) -> bool:  # fmt: skip
        return bool(self._call(timeout, lambda r: r.set(key, value, px=_ms(ttl), nx=True)))

    def delete(self, key: str, *, timeout: Secs = None) -> None:
        self._call(timeout, lambda r: r.delete(key))

    def incr(self, key: str, amount: int = 1, ttl: Secs = None, *, timeout: Secs = None) -> int:
        ms = _ms(ttl)
        args = [amount, "" if ms is None else ms]
        return int(self._call(timeout, lambda r: self._incr(keys=[key], args=args, client=r)))

    def sadd(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int:
        items = list(members)
        return int(self._call(timeout, lambda r: r.sadd(key, *items))) if items else 0

    def srem(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int:
        items = list(members)
        return int(self._call(timeout, lambda r: r.srem(key, *items))) if items else 0

    def smembers(self, key: str, *, timeout: Secs = None) -> set[str]:
        return set(self._call(timeout, lambda r: r.smembers(key)))

    def sismember(self, key: str, member: str, *, timeout: Secs = None) -> bool:
        return bool(self._call(timeout, lambda r: r.sismember(key, member)))

    def sany(self, key: str, members: list[str], *, timeout: Secs = None) -> str | None:
        if not members:
            return None
        found = self._call(timeout, lambda r: r.smismember(key, members))
        return next((m for m, hit in zip(members, found, strict=True) if hit), None)

    def hit(self, key: str, window: float, limit: int, *, timeout: Secs = None) -> tuple[int, bool]:
        now = self.clock()
        token = f"{now!r}:{os.getpid()}:{next(self._serial)}"
        args = [repr(now), repr(window), limit, token]
        count, allowed = self._call(timeout, lambda r: self._hit(keys=[key], args=args, client=r))
        return int(count), bool(allowed)

    def close(self) -> None:
        for client in self._clients.values():
            try:
                client.close()
            except (redis.RedisError, OSError):
                pass
        self._clients.clear()
