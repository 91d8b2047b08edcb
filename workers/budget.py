"""A CPU budget for each request a worker handles (``[filter] max_cpu_seconds``).

Why CPU time and not the wall clock: what a costly message takes from other mail is
CPU (two cores shared by every worker), and CPU time is a property of the message and
the filter -- the same message costs the same again on retry, whatever the load.  A
wall-clock limit would refuse a legitimate message because the machine was busy or a
scanner was slow; those have their own limits (the scanners' timeouts, and the pool's
``busy_timeout``, a 4xx).  So a message over the budget gets a permanent reply by
default (``on_cpu_limit``, 554 5.6.0): a tempfail would bring the same message back to
cost the same again on every retry until it expires.  CPU time never runs ahead of the
wall clock, so a budget not below ``busy_timeout`` could never answer before the pool
stops the worker: the config refuses one.

The budget is ``time.process_time()`` (user + system CPU of the worker) counted from the
request's arrival.  It is enforced two ways:

* ``check()`` at each boundary the runner passes (before each hook, each part of the
  walk, the rebuild): the usual way a message is stopped, between two hooks;
* a ``setitimer(ITIMER_PROF)`` timer, the same clock, as the backstop for a hook that
  never returns to a boundary (a loop in the filter): its SIGPROF handler raises
  ``OverBudget`` wherever the hook is.  Python runs signal handlers between bytecodes,
  so a single C call that never returns (one regular expression over a huge text) is
  stopped only by the pool's ``busy_timeout``.

``OverBudget`` is a ``BaseException``, like ``KeyboardInterrupt``: a filter's
``except Exception`` does not swallow it.  The timer is armed only in the main thread and
only when nothing else handles SIGPROF (a profiler), and disarmed, its handler restored,
after each request.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class OverBudget(BaseException):
    """A request used more CPU than ``[filter] max_cpu_seconds``."""

    def __init__(self, used: float, limit: float) -> None:
        super().__init__(f"{used:.2f} s of CPU used, [filter] max_cpu_seconds = {limit:g}")
        self.used = used
        self.limit = limit


class CpuBudget:
    """The budget of the request being handled (0 seconds: no budget)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._start = 0.0
        self._armed = False  # the timer's handler raises only while this is true
        self._spent = False  # the timer fired (its clock and process_time() differ by a tick)
        self._previous: Any = None

    def used(self) -> float:
        """CPU seconds used by the request so far."""
        return time.process_time() - self._start

    def check(self) -> None:
        """Raise ``OverBudget`` if the request has used its budget."""
        if self.seconds and self._start and (self._spent or self.used() > self.seconds):
            raise OverBudget(max(self.used(), self.seconds), self.seconds)  # (spent: the timer said so)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count the block's CPU from now; arm the backstop timer where one can be."""
        self._start = time.process_time()
        self._spent = False
        timer = bool(self.seconds) and self._arm()
        try:
            yield
        finally:
            self.stop(timer)
            self._start = 0.0

    def stop(self, timer: bool = True) -> None:
        """Disarm the timer (idempotent): what follows is not counted by it."""
        self._armed = False
        if timer and self._previous is not None:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self._previous)
            self._previous = None

    def _arm(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGPROF)
        if previous not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return False  # a profiler's: leave it alone (the boundary checks still hold)
        self._previous = previous if previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGPROF, self._expired)
        self._armed = True
        signal.setitimer(signal.ITIMER_PROF, self.seconds)
        return True

    def _expired(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False  # once: the runner's own clean-up must not be interrupted
            self._spent = True  # a hook that swallows this is stopped at the next check()
            raise OverBudget(max(self.used(), self.seconds), self.seconds)  # the timer's clock said so
