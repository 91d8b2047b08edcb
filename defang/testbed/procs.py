"""Reading /proc for the test bed, the tests and the benchmarks: who is whose child, CPU;
starting and stopping the servers the test bed runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def stat_of(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name; raises OSError.

    The command name is cut at its last ")" (it may hold spaces and parentheses), so
    fields[0] is the state, fields[1] the ppid, fields[7] the minor page faults,
    fields[11:15] utime, stime, cutime, cstime in clock ticks.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def stat_fields() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, ``stat_of(pid)``) for every process; those that exit while being read are
    skipped."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_of(int(entry))
        except OSError:
            continue
        yield int(entry), fields


def titled(pids: Iterable[int], prefix: str) -> list[int]:
    """Those of ``pids`` whose title (command line) starts with ``prefix``, e.g.
    "defang-worker"; processes that exit while being read are skipped."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmd.startswith(prefix):
            out.append(pid)
    return out


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM to a server we started (by its PID), SIGKILL if it outlives ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, what: str,
               output: Callable[[], str] = str) -> None:  # fmt: skip
    """Return once ``ready()`` (an OSError from it: not yet), polled every 50 ms.

    RuntimeError, with the end of ``output()`` (what the server said), when ``proc`` exits
    first or ``timeout`` passes; the caller stops it (``stop_process``) and cleans up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {output()[-2000:]}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout}s: {output()[-2000:]}")
