"""``defang run``: the multiplexor and the milter front end under one parent.

The parent has no threads and runs no admin code, so it can start both daemons
safely (never fork a process that runs threads: the front end does).  It forks them
rather than exec'ing new interpreters: the command line imported both daemons' code
before calling ``run``, so the interpreter and the modules are pages the three
processes share (measured: 30 MB of PSS for three fresh interpreters, 14 MB forked).
Each daemon is an entry point handed over by the command line (``DaemonMain``: called
in the forked child with the descriptor to write "ready" to), so this module imports
neither daemon.  It starts the
multiplexor first and waits for its "ready" line (which comes only once filter.py
loaded, so a broken filter stops ``defang run`` with the file:line error), then the
front end.  It restarts a daemon that dies, with a back-off.  On TERM (graceful) it
stops the front end first (no new mail; it finishes the messages in progress, whose
decisions the multiplexor still makes), then the multiplexor.  On INT or QUIT (fast) it
stops the multiplexor first, which answers everything in flight with a tempfail, then
the front end.  SIGHUP is passed to the multiplexor: a reload; SIGUSR1 to both daemons
(a ``[log] file`` reopened).
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from defang.core import child, logsetup
from defang.core.config import Config
from defang.core.proctitle import set_title

log = logging.getLogger("defang.run")

START_TIMEOUT = 60.0
STOP_TIMEOUT_FAST = 10.0
# libmilter's listener notices a stop only between 5 s polls (MI_CHK_TIME), plus margin.
MILTER_STOP_SLACK = 10.0


class StartError(Exception):
    pass


#: a daemon that ran at least this long before it died was healthy: its back-off starts over
HEALTHY_RUN = 60.0
MAX_BACKOFF = 30


@dataclass
class Backoff:
    """How long to wait before restarting a daemon that died: 2, 4, 8, 16, 30, 30 s...
    while it keeps dying soon after each start, and 2 s again once it had run for
    ``HEALTHY_RUN`` (a crash a week apart is not a crash loop).  Pure: it is given the
    monotonic times."""

    failures: int = 0
    started: float = 0.0

    def start(self, now: float) -> None:
        self.started = now

    def died(self, now: float) -> int:
        """Seconds to wait before the next start."""
        if now - self.started >= HEALTHY_RUN:
            self.failures = 0
        self.failures += 1
        return min(2 ** min(self.failures, 5), MAX_BACKOFF)


HANDLED_SIGNALS = child.PARENT_SIGNALS
#: a daemon's entry point, run in the forked child with the descriptor to announce
#: "ready" (or "error: why") on; returns the exit code
DaemonMain = Callable[[int], int]


class Daemon:
    def __init__(self, name: str, main: DaemonMain) -> None:
        self.name = name
        self.main = main
        self.proc: child.Child | None = None
        self.backoff = Backoff()
        self.next_start = 0.0

    def start(self) -> None:
        self.backoff.start(time.monotonic())
        r, w = os.pipe()
        main = self.main
        self.proc = child.fork(lambda: main(w), keep_fds=[w])
        os.close(w)
        try:
            line = _read_line(r, START_TIMEOUT)
        finally:
            os.close(r)
        if line != "ready":
            self.stop(signal.SIGKILL, 2)
            raise StartError(line.removeprefix("error: ") or f"{self.name} exited during start-up")

    def stop(self, sig: int, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %.0fs: KILL", self.name, proc.pid, timeout)
            proc.kill()
            proc.wait()


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error: no ready signal within {timeout:.0f}s"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def run(cfg: Config, multiplexor: DaemonMain, milter: DaemonMain) -> int:
    set_title("defang-run")
    gc.freeze()  # the objects imported so far stay shared: no collection writes to them
    mx = Daemon("multiplexor", multiplexor)
    fe = Daemon("milter", milter)
    try:
        mx.start()
    except StartError as exc:
        print(f"defang: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        fe.start()
    except StartError as exc:
        print(f"defang: cannot start the milter: {exc}", file=sys.stderr)
        mx.stop(signal.SIGTERM, 10)
        return 1
    log.info("defang running: milter on %s, control socket %s, filter %s, up to %d workers (pids: "
             "multiplexor %d, milter %d)", cfg.milter_socket, cfg.control_socket, cfg.filter,
             cfg.max_workers, mx.proc.pid, fe.proc.pid)  # fmt: skip

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (*HANDLED_SIGNALS, signal.SIGUSR1):
        signal.signal(sig, lambda *_: None)
    stop_signal = 0
    while not stop_signal:
        ready, _, _ = select.select([wake_r], [], [], 1.0)
        signals = os.read(wake_r, 512) if ready else b""
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                stop_signal = signum
            elif signum == signal.SIGHUP and mx.proc is not None:
                log.info("SIGHUP: asking the multiplexor to reload the config and the filter")
                mx.proc.send_signal(signal.SIGHUP)
            elif signum == signal.SIGUSR1 and logsetup.reopen():  # a [log] file or syslog
                for d in (mx, fe):  # they reopen theirs; the workers notice a renamed file
                    if d.proc is not None and d.proc.poll() is None:
                        d.proc.send_signal(signal.SIGUSR1)
        if not stop_signal:
            for d in (mx, fe):
                _keep_alive(d)
    name = signal.Signals(stop_signal).name
    if stop_signal == signal.SIGTERM:
        # Graceful: the milter stops listening and finishes the messages in progress
        # (their decisions still come from the running multiplexor), then the multiplexor
        # finishes whatever is left.  The milter may need a whole decision's time, plus
        # the 5 s libmilter's listener takes to notice the stop.
        log.info("%s: stopping the milter (finishing messages in progress), then the multiplexor",
                 name)  # fmt: skip
        fe.stop(signal.SIGTERM, cfg.effective_request_timeout() + MILTER_STOP_SLACK)
        mx.stop(signal.SIGTERM, cfg.busy_timeout + cfg.busy_grace + 10)
    else:
        # Fast: the multiplexor first, which answers every request in flight with a
        # tempfail at once; the milter then passes those on and has nothing to wait for.
        log.info("%s: fast stop: the multiplexor (in-flight messages get a tempfail), then the "
                 "milter", name)  # fmt: skip
        mx.stop(signal.SIGINT, STOP_TIMEOUT_FAST)
        fe.stop(signal.SIGTERM, STOP_TIMEOUT_FAST + MILTER_STOP_SLACK)
    log.info("defang stopped")
    return 0


def _keep_alive(d: Daemon) -> None:
    if d.proc is None or d.proc.poll() is None:
        return
    now = time.monotonic()
    if d.next_start == 0.0:
        delay = d.backoff.died(now)
        d.next_start = now + delay
        log.error("%s (pid %d) exited with %s; restarting in %ds", d.name, d.proc.pid,
                  d.proc.returncode, delay)  # fmt: skip
        return
    if now < d.next_start:
        return
    d.next_start = 0.0
    try:
        d.start()
        log.info("%s restarted (pid %d)", d.name, d.proc.pid)
    except StartError as exc:
        log.error("%s failed to restart: %s", d.name, exc)
