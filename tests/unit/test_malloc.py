"""glibc malloc settings: each does what its docstring says, seen from outside.

Each check runs in a fresh interpreter (the settings are process-wide) and compares
with the same program without the setting, so a check cannot pass by accident.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from paths import REPO

HEAP_KEPT = """
    import ctypes, sys
    from defang.core import malloc
    malloc.fix_mmap_threshold()

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    base = rss_mb()
    blocks = [bytes(100 * 1024) for _ in range(500)]  # 50 MB of heap (under the threshold)
    last = blocks[-1]  # kept: the heap's top cannot shrink past it
    del blocks
    before = rss_mb() - base
    if sys.argv[-1] == "give-back":
        malloc.give_back_free_memory()
    print(f"{before:.0f} {rss_mb() - base:.0f}")
"""


def held_mb(*argv: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(HEAP_KEPT), *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    return float(before), float(after)


def test_free_heap_pages_go_back_to_the_system() -> None:
    before, after = held_mb("keep")
    assert before > 25 and after > 25, "without it the heap keeps most of the freed 50 MB"
    before, after = held_mb("give-back")
    assert before > 25 and after < 5


ARENAS = """
    import ctypes, sys, threading
    from defang.core import malloc
    if sys.argv[-1] == "limit":
        malloc.limit_arenas(2)
    go = threading.Barrier(8)

    def work():
        go.wait()
        [bytes(2000) for _ in range(2000)]  # over Python's small-object size: glibc malloc

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def arenas(*argv: str) -> int:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(ARENAS), *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stderr.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_threads_share_at_most_the_arenas_allowed() -> None:
    assert arenas("free") > 2, "threads get arenas of their own without a limit"
    assert arenas("limit") <= 2
