"""Free loopback TCP ports for the test bed.

The test bed only ever binds 127.0.0.1 (never a public address, never port 25), so the
port is probed on that address.  There is an unavoidable race between closing the probe
socket and the real server binding the port; the kernel hands out ephemeral ports
round-robin, so a port just returned is not reused for a long time in practice.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Binds port 0 (the kernel picks an unused port), reads it back and closes the socket.
    No SO_REUSEADDR: a port still in TIME_WAIT is then not handed out as "free".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
