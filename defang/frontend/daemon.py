"""``defang milter``: the front-end daemon (libmilter's threads, our callbacks).

``serve`` opens the milter socket, routes libmilter's callbacks to the ``Session`` of
each connection (``callbacks.install_callbacks``) and runs libmilter's loop until a stop
signal.
"""

from __future__ import annotations

import logging
import os
import socket

import milter

from defang.core import malloc
from defang.core.config import Config, unix_socket_path
from defang.core.privileges import give_socket
from defang.core.proctitle import set_title
from defang.frontend.callbacks import install_callbacks
from defang.frontend.mxclient import MultiplexorClient
from defang.frontend.service import FrontEnd

log = logging.getLogger("defang.milter")


#: malloc arenas for libmilter's threads (see defang.core.malloc.limit_arenas)
MILTER_ARENAS = 2


def serve(cfg: Config, ready_fd: int | None = None) -> int:
    set_title("defang-milter")
    malloc.limit_arenas(MILTER_ARENAS)
    client = MultiplexorClient(
        str(cfg.multiplexor_socket), cfg.effective_request_timeout(), cfg.max_frame_size
    )
    fe = FrontEnd(cfg, client)
    fe.spool.clean()
    fe.hooks.refresh()
    install_callbacks(fe)
    milter.setconn(cfg.milter_socket)
    milter.settimeout(cfg.milter_io_timeout)
    path = unix_socket_path(cfg.milter_socket)
    old = os.umask(0o777 & ~cfg.socket_mode)
    try:
        milter.opensocket(True)
    finally:
        os.umask(old)
    if path is not None:
        give_socket(path, cfg.socket_mode, cfg.socket_group)
    elif cfg.tcp_nodelay:
        _nodelay_listener(cfg.milter_socket)
    log.info("milter listening on %s (spool %s, request timeout %.0fs)", cfg.milter_socket,
             cfg.spool_dir, cfg.effective_request_timeout())  # fmt: skip
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    milter.main()  # returns on SIGTERM/SIGINT/SIGHUP (libmilter's signal thread)
    fe.drain(cfg.effective_request_timeout())  # libmilter does not wait for its connections
    client.close()
    if path is not None:  # libmilter closes the socket but leaves the file behind
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    log.info("milter stopped")
    return 0


def _nodelay_listener(spec: str) -> None:
    """Turn off Nagle on libmilter's TCP listener (accepted sockets inherit it on Linux).

    libmilter never sets TCP_NODELAY: its small back-to-back writes at end of message (a
    modification, then the reply) wait for the MTA's delayed ACK, about 40 ms each.  It
    owns the socket, so find it among our descriptors: the listening TCP socket on our port.
    """
    port = int(spec.partition(":")[2].partition("@")[0])
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):  # fmt: skip
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                log.info("TCP_NODELAY set on the milter listener %s (fd %d)", spec, fd)
                return
        except OSError:
            pass
        finally:
            sock.close()
    log.warning("could not find libmilter's listener for %s to set TCP_NODELAY", spec)
