"""Reading /proc for the test bed, the tests and the benchmarks: who is whose child, CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator


def stat_fields() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/PID/stat after the command name) for every process.

    The command name is cut at its last ")" (it may hold spaces and parentheses), so
    fields[0] is the state, fields[1] the ppid, fields[11:15] utime, stime, cutime,
    cstime in clock ticks.  Processes that exit while being read are skipped.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        yield int(entry), fields
