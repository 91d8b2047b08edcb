"""The Python-only TCP_NODELAY fix for defang's inet milter socket, for scripts/bench.

scripts/bench puts this directory first on PYTHONPATH for the "inet + nodelay" cell and
sets DEFANG_BENCH_NODELAY=1.  In the ``defang milter`` process only, it wraps
``milter.opensocket`` so that, right after libmilter has created its listening socket,
TCP_NODELAY is set on it.  Linux copies TCP_NODELAY from a listening socket to every
socket accept() returns, so each milter connection libmilter accepts then sends its
small replies at once instead of waiting for the MTA's delayed ACK (Nagle).

This was the change proposed for the front end (then ``defang/milterd.py``; it has since
been made in ``defang/frontend/daemon.py``, ``serve``); running it from here measured it
without touching the daemon code.  Any other process (and any run without the variable) is left alone.
"""

from __future__ import annotations

import os
import socket
import sys


def set_listener_nodelay() -> list[int]:
    """Set TCP_NODELAY on every listening TCP socket this process holds; return their fds.

    libmilter does not expose its listening descriptor, so look for it: a socket fd in
    /proc/self/fd with SO_ACCEPTCONN set and an inet family.  ``socket.socket(fileno=)``
    on a dup() shares the kernel socket, so the option lands on libmilter's socket.
    """
    done: list[int] = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM and (
                s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done.append(fd)
        except OSError:
            pass
        finally:
            s.close()
    return done


def _install() -> None:
    argv = getattr(sys, "orig_argv", [])
    if os.environ.get("DEFANG_BENCH_NODELAY") != "1" or "milter" not in argv or "defang" not in argv:
        return
    import milter

    real_open = milter.opensocket

    def opensocket(rmsock: bool) -> None:
        real_open(rmsock)
        fds = set_listener_nodelay()
        print(f"bench nodelay: TCP_NODELAY set on listening fds {fds}", file=sys.stderr, flush=True)

    milter.opensocket = opensocket


_install()
