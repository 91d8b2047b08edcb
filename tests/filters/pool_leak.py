"""Pool test filter that leaks memory: every message appends 4 MiB to a global list.

A real leak looks like this (a cache that never evicts); ``max_rss`` must recycle
the worker before it grows without bound.  The pages are written (not just
allocated) so they count in RSS.
"""

import os

LEAK: list[bytes] = []
CHUNK = 4 * 1024 * 1024


def filter_end(msg):
    LEAK.append(os.urandom(16) * (CHUNK // 16))
    msg.add_header("X-Worker-Pid", str(os.getpid()))
    msg.add_header("X-Leaked", str(len(LEAK)))
