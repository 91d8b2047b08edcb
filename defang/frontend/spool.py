"""The front end's spool: one flat file per message in flight, reused while mail flows.

``SpoolDir`` is the directory all sessions share: it hands out files, takes them back
for the next message, and removes them when no transaction is left (an idle spool is
empty).  ``SpoolFile`` is one transaction's file, written as the MTA passes the message.

Files are ``<spool>/<pid>.<n>.eml``.  Flat, not a directory per message: on a
disk-backed spool every mkdir, rmdir and unlink costs kernel time, and a directory per
message tripled them (measured: the front end's largest cost per 2 KB message).  A
worker that rebuilds the body writes it beside the file, as ``<same name>.new``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from defang.core.wire import NEW_BODY_SUFFIX

log = logging.getLogger("defang.milter")

# Header and body bytes are kept in memory up to this much and the spool file is taken
# at the first flush: at end of message for a small one, then one write (no buffered
# file object: no fstat, lseek, flush).  Below malloc's mmap threshold (128 KiB): a bigger
# buffer costs an mmap and munmap, and fresh page faults, per message.  Body chunks (up
# to 64 KiB) that do not fit are written straight through.
SPOOL_BUFFER = 16 * 1024
SPOOL_FREE_MAX = 256  # free spool files kept for reuse (see SpoolDir.take)
# Earlier messages' bytes left in free spool files, in all (see SpoolDir.give).
SPOOL_KEEP_BYTES = 64 * 2**20


class SpoolError(Exception):
    """The spool file could not be taken, written or cut; the text says what and why."""


class SpoolDir:
    """The spool directory, shared by all sessions (libmilter's threads: locked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self.transactions = 0  # between MAIL FROM and end of message/abort/close
        self._lock = threading.Lock()  # guards the count and the free list
        # (path, fd, length of the earlier message still in it), for the next message
        self._free: list[tuple[str, int, int]] = []
        self._kept = 0  # the sum of those lengths
        self._seq = 0

    def transaction(self, started: bool) -> None:
        with self._lock:
            self.transactions += 1 if started else -1
            idle = self.transactions <= 0 and self._free
        if idle:
            self._remove_free()

    def take(self) -> tuple[str, int, int]:
        """A file for a message: ``(path, fd open for writing, length)``, where the first
        ``length`` bytes are an earlier message's, to be written over.

        Spool files are reused while mail flows instead of being created and removed
        for every message: creating a file is the kernel's costliest step here.  On
        ext4 without a journal (the VM the benchmarks run on) each new inode is looked
        for past every inode freed in the last minute or more (``recently_deleted``),
        which took half the front end's CPU behind Postfix, growing with the mail rate.
        A file is reused only if no worker can still be reading it (``give``); when no
        transaction is in progress the free ones are removed.  Raises OSError.
        """
        with self._lock:
            if self._free:
                path, fd, length = self._free.pop()
                self._kept -= length
                return path, fd, length
            self._seq += 1
            n = self._seq
        path = f"{self.path}/{self.pid:x}.{n}.eml"
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), 0

    def wanted(self, mine: bool) -> bool:
        """Is a file worth keeping: is a transaction besides the caller's under way?
        (One message at a time creates and removes its file.)"""
        return self.transactions - mine > 0 and len(self._free) < SPOOL_FREE_MAX

    def give(self, path: str, fd: int, length: int) -> None:
        """Take back a file of ``length`` bytes that no worker holds, for the next message.

        Its bytes stay, for the next message to write over: writing over pages already
        in the page cache costs a fourth of allocating them, filling them and freeing
        them again at the end of the message (7 MB: 0.6-1.0 against 2.9-4.1 ms of CPU,
        on ext4 and on tmpfs; the front end's CPU per 7 MB message went from 8.8-10.3
        to 5.2-6.2 ms).  Only past SPOOL_KEEP_BYTES in all is a file cut short (rarely:
        under the lock, so nobody takes it half cut).
        """
        with self._lock:
            # kept only while a transaction is in progress: the last one to end removes it
            if self.transactions > 0 and len(self._free) < SPOOL_FREE_MAX:
                keep = min(length, SPOOL_KEEP_BYTES - self._kept)
                if keep == length or cut(fd, keep):
                    self._free.append((path, fd, keep))
                    self._kept += keep
                    return
        remove(path, fd)

    def _remove_free(self) -> None:
        with self._lock:
            if self.transactions > 0:
                return
            free, self._free = self._free, []
            self._kept = 0
        for path, fd, _ in free:
            remove(path, fd)

    def clean(self) -> None:
        """Remove what a previous run left behind (a crash, a kill -9)."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        stale = 0
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # left by an older layout
            else:
                entry.unlink(missing_ok=True)
            stale += 1
        if stale:
            log.info("removed %d stale spool entries from %s", stale, self.path)


class SpoolFile:
    """One transaction's spool file: a small buffer, then the file (taken at the first flush)."""

    __slots__ = ("dir", "path", "fd", "at", "old", "buf", "buffered", "reusable", "new_body")

    def __init__(self, spool: SpoolDir) -> None:
        self.dir = spool
        self.path: str | None = None
        self.fd = -1
        self.at = 0  # this message's bytes written so far
        self.old = 0  # bytes of an earlier message in the file (see SpoolDir.give)
        self.buf: list[bytes] = []  # bytes not yet written ...
        self.buffered = 0  # ... and their length
        self.reusable = True  # no worker can still be reading the file
        self.new_body = False  # a worker may have written <path>.new

    def write(self, data: bytes) -> None:
        """Append: to the buffer while it fits, else out to the file.  Raises SpoolError."""
        if self.buffered + len(data) <= SPOOL_BUFFER:
            self.buf.append(data)
            self.buffered += len(data)
        else:
            self.flush(data)

    def flush(self, data: bytes = b"") -> None:
        """Write the buffer, then ``data``, to the file.  Raises SpoolError."""
        if self.fd < 0:
            try:
                self.path, self.fd, self.old = self.dir.take()
            except OSError as exc:
                raise SpoolError(f"spool ({exc})") from None
            self.at = 0
        try:
            if self.buf:
                self.at = _write_all(self.fd, b"".join(self.buf), self.at)
                self.buf.clear()
                self.buffered = 0
            if data:
                self.at = _write_all(self.fd, data, self.at)
        except OSError as exc:  # disk full, spool removed under us: never accept blind
            self.reusable = False  # how much of it was written is not known: not reused
            raise SpoolError(f"spool write ({exc})") from None

    def finish(self) -> str:
        """Everything written, an earlier message's longer tail cut off; the file's path."""
        self.flush()
        if self.old > self.at:
            if not cut(self.fd, self.at):
                raise SpoolError("spool truncate")
            self.old = self.at
        return self.path  # type: ignore[return-value]

    def discard(self, conn_id: str, in_transaction: bool) -> None:
        """Done with the file: given back for the next message, or removed if a worker
        may still hold it."""
        self.buf.clear()
        self.buffered = 0
        path, fd = self.path, self.fd
        if path is not None:
            length = max(self.at, self.old)
            self.path, self.fd, self.at, self.old = None, -1, 0, 0
            if self.new_body:
                unlink(path + NEW_BODY_SUFFIX, conn_id)
            if self.reusable and self.dir.wanted(in_transaction):
                self.dir.give(path, fd, length)
            else:
                remove(path, fd, conn_id)
        self.reusable, self.new_body = True, False


def cut(fd: int, length: int) -> bool:
    """Truncate the file to ``length`` bytes; False if that failed."""
    try:
        os.ftruncate(fd, length)
    except OSError:
        return False
    return True


def remove(path: str, fd: int, conn_id: str = "-") -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    unlink(path, conn_id)


def unlink(path: str, conn_id: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("conn %s: cannot remove spool file %s: %s", conn_id, path, exc)


def _write_all(fd: int, data: bytes, offset: int) -> int:
    """Write ``data`` at ``offset``; returns the offset past it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    return offset
