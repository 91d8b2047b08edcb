"""Thread-CPU probe of defang's milter front end, for ``scripts/bench --pyspy``.

py-spy cannot see libmilter's connection threads while they run C code with no Python
thread state, so its view of the front end is partial.  This probe measures instead:
with DEFANG_BENCH_PROBE=<file> set, in the ``defang milter`` process only, it wraps the
front end's callbacks and the steps inside them with ``time.thread_time_ns()`` (CPU time
of the calling thread: exact for code that runs on one thread, unaffected by the GIL
waits of other threads) and writes per-step totals as JSON to <file> at exit.  The
process's total CPU minus the callbacks' is what libmilter, pymilter's glue and the
GIL handoffs cost.  Nothing else is changed; without the variable it does nothing.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time

_stats: dict[str, list[int]] = {}
_lock = threading.Lock()


def _wrap(owner: object, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def probe(*args, **kwargs):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            c, w = time.thread_time_ns() - c0, time.perf_counter_ns() - w0
            with _lock:
                s = _stats.setdefault(label, [0, 0, 0])
                s[0] += 1
                s[1] += c
                s[2] += w

    setattr(owner, name, probe)


def _dump(path: str) -> None:
    t = os.times()
    doc = {"process_cpu_s": t.user + t.system, "steps": {k: {"calls": v[0], "cpu_ns": v[1], "wall_ns": v[2]}
                                                        for k, v in _stats.items()}}  # fmt: skip
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _install() -> None:
    path = os.environ.get("DEFANG_BENCH_PROBE")
    argv = getattr(sys, "orig_argv", [])
    if not path or "milter" not in argv or "defang" not in argv:
        return
    from defang.core import wire
    from defang.frontend import mxclient, service, session, spool

    s = session.Session
    for name in ("negotiate", "connect", "hello", "envfrom", "envrcpt", "header", "body", "eom", "abort",
                 "close"):  # fmt: skip
        _wrap(s, name, f"callback {name}")
    for name in ("_end_transaction", "_collect_macros", "_write", "_apply", "_conn"):
        _wrap(s, name, f"  step Session.{name}")
    for name in ("flush", "finish", "discard"):
        _wrap(spool.SpoolFile, name, f"  step SpoolFile.{name}")
    _wrap(session.Session, "__init__", "  step Session.__init__")
    _wrap(service.FrontEnd, "decide", "  step FrontEnd.decide (request + reply)")
    _wrap(mxclient.MultiplexorClient, "_exchange", "    step sending, waiting for and reading the reply")
    _wrap(wire, "encode", "    step wire.encode")
    _wrap(session.log, "info", "  step log.info")
    atexit.register(_dump, path)


_install()
