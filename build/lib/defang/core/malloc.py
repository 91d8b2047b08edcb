"""glibc malloc settings for our long-lived processes (nothing happens without glibc).

Why: memory that glibc keeps after a message is private to the process that freed it,
and defang runs ten workers and a threaded front end.  Each setting here was measured
through the benchmark's Postfix (``bench/profiles/``); elsewhere than glibc there is no
``mallopt`` and the functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_M_ARENA_MAX = -8

#: allocations this big get their own mapping, unmapped when freed
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold() -> None:
    """Make glibc give every allocation over MMAP_THRESHOLD back to the system when freed.

    glibc raises its mmap threshold to the size of the last mmapped block freed, so
    after one 7 MB message a worker's next big buffers come from the heap, and the heap
    keeps them: measured, every worker that had read a 7 MB message kept ~9 MB more
    private memory for good (10 workers: +90 MB of PSS).  A fixed threshold switches
    that adjustment off; forked children inherit it.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def limit_arenas(count: int) -> None:
    """At most ``count`` malloc arenas (call before starting threads).

    glibc gives threads arenas of their own, up to 8 per core: the front end's
    libmilter threads each dirtied one (15 arenas, ~3 MB).  Python's code runs one
    thread at a time under the GIL, so a thread rarely waits for an arena.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, count)


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (~0.3 ms after a 7 MB message).

    A worker's heap keeps the pages it used while reading a big message: measured,
    2 MB per worker after a 7 MB message, for as long as the worker lives.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
