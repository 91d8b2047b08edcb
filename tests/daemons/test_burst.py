"""The shipped pool sizes against Postfix's default: 100 smtpd processes (and more), every
one of them at end of data at the same moment, and none gets 451 4.3.2 busy.

The filter holds each message until the test opens a gate.  The sessions start one after
the other, each once the one before has reached the multiplexor (its status: busy
workers + queue depth), and the gate opens once all are there: all wait at once, whatever
the machine's speed.  One after the other because libmilter's worker pool (Debian builds
it with one) can leave a command that arrives together with another session's waiting
behind a held end of message; with Postfix that is a wait, here it would hold the
session for as long as the gate is shut.  Through the real daemons, driven by the fake
MTA (one milter connection per SMTP session, as Postfix's smtpd has).
"""

import shutil
import threading

from daemon import REPO, Defang, traversable_dir
from fakemta import MilterSession
from mta import wait_for

from defang.cli.ctl import request
from defang.core import config

SESSIONS = 110  # Postfix's default_process_limit (100 smtpd processes, a session each), and more
GATED = '''
import os
import time


def filter_end(msg):
    while not os.path.exists({gate!r}):
        time.sleep(0.02)
    msg.add_header("X-Through", "yes")
'''


def session(path: str, n: int, out: dict) -> None:
    with MilterSession(path, timeout=300) as s:
        s.connect(port=40000 + n)
        s.helo()
        s.mail(f"a{n}@example.org")
        s.rcpt("b@example.org")
        out[n] = s.message(b"From: a@example.org\r\nSubject: burst %d\r\n\r\nHello\r\n" % n, queue_id=f"B{n}")


def in_flight(d: Defang) -> int:
    """Messages the multiplexor holds: on a worker, or queued."""
    status = request(str(d.control_socket), "status")
    return sum(w.state == "busy" for w in status.workers) + status.queue["depth"]


def test_the_shipped_pool_holds_more_sessions_than_postfix_runs_all_at_end_of_data():
    shipped = config.load(REPO / "etc" / "defang.toml")
    pool = {k: getattr(shipped, k) for k in ("min_workers", "max_workers", "min_spare", "queue_size",
                                             "queue_timeout", "busy_timeout")}  # fmt: skip
    files = traversable_dir("defang-burst-")
    gate = files / "open"
    (files / "filter.py").write_text(GATED.format(gate=str(gate)))
    d = Defang(files / "filter.py", settings={"multiplexor": pool}).start()
    results: dict[int, object] = {}
    threads = [threading.Thread(target=session, args=(d.milter_path, n, results)) for n in range(SESSIONS)]
    try:
        for n, t in enumerate(threads, 1):
            t.start()
            wait_for(f"message {n} in the multiplexor", lambda n=n: in_flight(d) >= n or results, timeout=60)
            assert not results, results  # answered while the gate is shut: on_busy
        status = request(str(d.control_socket), "status")
        assert in_flight(d) == SESSIONS and status.queue["depth"] == SESSIONS - shipped.max_workers
        gate.touch()
        for t in threads:
            t.join(300)
        replies = sorted({r.reply for r in results.values()})
        assert len(results) == SESSIONS and replies == ["continue"], replies
        assert all(("addheader", ("X-Through", "yes")) in [(a[0], a[1][:2]) for a in r.actions]
                   for r in results.values())  # fmt: skip
        assert "busy" not in d.status()["events"]
        assert "busy tempfail" not in d.log()
    finally:
        gate.touch()
        for t in threads:
            if t.ident is not None:  # started
                t.join(60)
        d.stop()
        d.cleanup()
        shutil.rmtree(files, ignore_errors=True)
