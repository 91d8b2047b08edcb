"""The front end's memory does not grow with message size (bodies stream to the spool).

20 concurrent 20 MB messages against 20 concurrent 20 KB ones, through real Postfix;
the front end's RSS is sampled every 10 ms.  400 MB of mail in flight must not show
up in the front end: the bound below leaves room for libmilter's per-connection
buffers and Python's allocator, not for the messages.
"""

import threading
import time

import psutil
import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix

from defang.testbed.smtpclient import send_many

pytestmark = [pytest.mark.integration, needs_postfix]

CONCURRENCY = 20


def message(size: int, i: int) -> bytes:
    line = b"A" * 76 + b"\r\n"
    body = line * (size // len(line))
    return (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: big %d\r\n"
            b"Message-ID: <mem-%d-%d@example.org>\r\n\r\n" % (i, size, i)) + body  # fmt: skip


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_burst(stack, size: int) -> tuple[int, float]:
    pid = stack.defang.pids("defang-milter")[0]
    stack.sink.clear()
    msgs = [("alice@example.org", ["bob@example.org"], message(size, i)) for i in range(CONCURRENCY)]
    start = time.monotonic()
    with PeakRss(pid) as rss:
        results = send_many("127.0.0.1", stack.postfix.smtp_port, msgs, concurrency=CONCURRENCY,
                            timeout=300)  # fmt: skip
    elapsed = time.monotonic() - start
    assert all(r.data and r.data[0] == 250 for r in results), [r.data for r in results]
    got = stack.sink.wait_for(CONCURRENCY, timeout=300)
    assert all(len(m.raw) > size for m in got)
    return rss.peak, elapsed


def test_front_end_rss_does_not_grow_with_message_size(capsys):
    with Stack(FILTERS / "add_header_only.py",
               settings={"multiplexor": {"min_workers": 4, "max_workers": 8}}) as s:  # fmt: skip
        small_peak, small_t = run_burst(s, 20 * 1024)
        big_peak, big_t = run_burst(s, 20 * 1024 * 1024)
    with capsys.disabled():
        print(f"\nfront end peak RSS: {small_peak / 2**20:.1f} MB with {CONCURRENCY} x 20 KB "
              f"({small_t:.1f}s), {big_peak / 2**20:.1f} MB with {CONCURRENCY} x 20 MB "
              f"({big_t:.1f}s, {CONCURRENCY * 20} MB in flight)")  # fmt: skip
    assert big_peak - small_peak < 32 * 2**20, (small_peak, big_peak)
