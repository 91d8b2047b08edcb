"""The SQLite back end of the shared state: one file on this host, no server.

- WAL mode: readers never wait for the writer, and one writer at a time waits for the
  other (``busy_timeout`` = the call's timeout) instead of failing with "database is
  locked"; every write is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock
  first (a deferred transaction that reads and then writes can fail at once, past any busy
  timeout, when another writer went first).
- The file is made 0600 (and with it SQLite's -wal and -shm files).
- One connection per worker (``defang.workers.stores.state.PerProcess``).
- ``synchronous = NORMAL``: a power cut may lose the last transactions (a greylisted
  sender is asked to retry once more), never corrupt the file.
- Expiry: a read ignores expired rows (lazily); the rows themselves are deleted by a sweep
  that a writing worker runs at most every ``sweep_interval`` seconds.  defang has no
  timer job, so the sweep rides on the writes.

A failure (locked past the timeout, a read-only or missing folder, a corrupt file) is a
``StateError`` naming the file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from defang.workers.stores.state_errors import Clock, Secs, StateError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL);
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS sets (key TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (key, member));
CREATE TABLE IF NOT EXISTS events (key TEXT NOT NULL, t REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_key ON events (key, t);
CREATE INDEX IF NOT EXISTS events_expires ON events (expires);
"""


def _create(path: Path) -> None:
    """Make the file 0600 if it is not there (SQLite gives its -wal and -shm files the
    same mode): it holds envelope addresses, and the runtime dir lets others through."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass


def _expires(now: float, ttl: float | None) -> float | None:
    return None if ttl is None else now + ttl


class SqliteStore:
    """One connection to the state file (see the module's docstring)."""

    def __init__(self, path: Path, timeout: float, clock: Clock, sweep_interval: float = 300.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.clock = clock
        self.sweep_interval = sweep_interval
        self._busy_ms = -1
        self._swept = clock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _create(self.path)
            self.db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                      check_same_thread=False)  # fmt: skip
            self._busy(None)
            self._first_use(time.monotonic() + timeout)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"state file {self.path}: {exc}") from None

    def _first_use(self, deadline: float) -> None:
        """WAL mode and the tables, once per connection.  Switching a new file to WAL takes
        a lock that SQLite's busy timeout does not wait for: when several workers open a
        new file at once, the others get "database is locked" at once.  They try again
        until the call's timeout (a few milliseconds apart), as the busy timeout would."""
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
                return
            except sqlite3.OperationalError as exc:
                if self.db.in_transaction:
                    self.db.rollback()
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _busy(self, timeout: float | None) -> None:
        ms = int((self.timeout if timeout is None else timeout) * 1000)
        if ms != self._busy_ms:
            self.db.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms

    def _read(self, timeout: float | None, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        try:
            self._busy(timeout)
            return fn(self.db, self.clock())
        except sqlite3.Error as exc:
            raise StateError(f"state file {self.path}: {exc}") from None

    def _write(self, timeout: float | None, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        db = self.db
        try:
            self._busy(timeout)
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock()
                result = fn(db, now)
                if now - self._swept >= self.sweep_interval or now < self._swept:
                    self._sweep(db, now)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result
        except sqlite3.Error as exc:
            raise StateError(f"state file {self.path}: {exc}") from None

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
        db.execute("DELETE FROM events WHERE expires <= ?", (now,))
        self._swept = now

    # --- values and counters

    def get(self, key: str, *, timeout: Secs = None) -> str | None:
        def op(db: sqlite3.Connection, now: float) -> str | None:
            row = db.execute("SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
                             (key, now)).fetchone()  # fmt: skip
            return None if row is None else row[0]

        return self._read(timeout, op)

    def set(self, key: str, value: str, ttl: Secs = None, *, timeout: Secs = None) -> None:
        def op(db: sqlite3.Connection, now: float) -> None:
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, value, _expires(now, ttl)))  # fmt: skip

        self._write(timeout, op)

    def set_if_absent(self, key: str, value: str, ttl: Secs = None, *,
                      timeout: Secs = None) -> bool:  # fmt: skip
        def op(db: sqlite3.Connection, now: float) -> bool:
            db.execute("DELETE FROM kv WHERE key = ? AND expires IS NOT NULL AND expires <= ?", (key, now))
            cur = db.execute("INSERT OR IGNORE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                             (key, value, _expires(now, ttl)))  # fmt: skip
            return cur.rowcount == 1

        return self._write(timeout, op)

    def delete(self, key: str, *, timeout: Secs = None) -> None:
        self._write(timeout, lambda db, now: db.execute("DELETE FROM kv WHERE key = ?", (key,)))

    def incr(self, key: str, amount: int = 1, ttl: Secs = None, *, timeout: Secs = None) -> int:
        def op(db: sqlite3.Connection, now: float) -> int:
            db.execute("DELETE FROM kv WHERE key = ? AND expires IS NOT NULL AND expires <= ?", (key, now))
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute("INSERT INTO kv (key, value, expires) VALUES (?, ?, ?)",
                           (key, str(amount), _expires(now, ttl)))  # fmt: skip
                return amount
            try:
                value = int(row[0]) + amount
            except ValueError:
                raise StateError(f"state key {key!r} holds {row[0]!r}, not a counter") from None
            db.execute("UPDATE kv SET value = ? WHERE key = ?", (str(value), key))
            return value

        return self._write(timeout, op)

    # --- sets

    def sadd(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int:
        rows = [(key, m) for m in members]
        return self._write(timeout, lambda db, now: db.executemany(
            "INSERT OR IGNORE INTO sets (key, member) VALUES (?, ?)", rows).rowcount)  # fmt: skip

    def srem(self, key: str, members: Iterable[str], *, timeout: Secs = None) -> int:
        rows = [(key, m) for m in members]
        return self._write(timeout, lambda db, now: db.executemany(
            "DELETE FROM sets WHERE key = ? AND member = ?", rows).rowcount)  # fmt: skip

    def smembers(self, key: str, *, timeout: Secs = None) -> set[str]:
        return self._read(timeout, lambda db, now: {r[0] for r in db.execute(
            "SELECT member FROM sets WHERE key = ?", (key,))})  # fmt: skip

    def sismember(self, key: str, member: str, *, timeout: Secs = None) -> bool:
        sql = "SELECT 1 FROM sets WHERE key = ? AND member = ?"
        return self._read(timeout, lambda db, now: db.execute(sql, (key, member)).fetchone() is not None)

    def sany(self, key: str, members: list[str], *, timeout: Secs = None) -> str | None:
        if not members:
            return None
        marks = ",".join("?" * len(members))
        found = self._read(timeout, lambda db, now: {r[0] for r in db.execute(
            f"SELECT member FROM sets WHERE key = ? AND member IN ({marks})", (key, *members))})  # fmt: skip
        return next((m for m in members if m in found), None)

    # --- sliding windows

    def hit(self, key: str, window: float, limit: int, *, timeout: Secs = None) -> tuple[int, bool]:
        def op(db: sqlite3.Connection, now: float) -> tuple[int, bool]:
            db.execute("DELETE FROM events WHERE key = ? AND t <= ?", (key, now - window))
            (count,) = db.execute("SELECT count(*) FROM events WHERE key = ?", (key,)).fetchone()
            if count >= limit:
                return count + 1, False
            db.execute("INSERT INTO events (key, t, expires) VALUES (?, ?, ?)", (key, now, now + window))
            return count + 1, True

        return self._write(timeout, op)

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
