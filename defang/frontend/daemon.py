"""``defang milter``: the front-end daemon (libmilter's threads, our callbacks).

``serve`` opens the milter socket, routes libmilter's callbacks to the ``Session`` of
each connection (``callbacks.install_callbacks``) and runs libmilter's loop until a stop
signal.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import milter

from defang.core import malloc
from defang.core.config import Config, socket_address, unix_socket_path
from defang.core.privileges import give_socket, user_name
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
    try:
        open_socket(cfg.milter_socket, cfg.socket_mode)
    except SocketError as exc:
        if ready_fd is None:
            print(f"defang: {exc}", file=sys.stderr)
            return 2
        os.write(ready_fd, f"error: {exc}\n".encode())
        return 1
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


class SocketError(Exception):
    """The milter socket cannot be opened; the text names it, our user and the OS's reason."""


def open_socket(spec: str, mode: int) -> None:
    """Have libmilter open its listening socket, or say in one line why it cannot.

    libmilter only says ``cannot opensocket``, so the usual reasons are checked first
    (the socket's directory is not ours to write: say, root's and 0750), and a failure
    is explained by trying the same bind ourselves.
    """
    path = unix_socket_path(spec)
    user = user_name(os.geteuid())
    if path is not None:
        why = _unwritable(path.parent)
        if why:
            raise SocketError(f"milter socket {path}: cannot create it as user {user}: {why}")
    old = os.umask(0o777 & ~mode)
    try:
        milter.opensocket(True)
    except milter.error:
        why = _bind_error(spec)
        raise SocketError(f"milter socket {spec}: cannot open it as user {user}: {why}") from None
    finally:
        os.umask(old)


def _unwritable(directory: Path) -> str | None:
    """Why we may not make a file in ``directory`` (its path, owner and mode), or None."""
    for d in (*reversed(directory.parents), directory):
        need = os.X_OK | (os.W_OK if d == directory else 0)
        if os.access(d, need):
            continue
        try:
            st = os.stat(d)
        except OSError as exc:
            return f"{d}: {exc.strerror}"
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return (f"{d}: Permission denied (owner {user_name(st.st_uid)}, group {group}, mode "
                f"{stat.S_IMODE(st.st_mode):04o})")  # fmt: skip
    return None


def _bind_error(spec: str) -> str:
    """The OS's reason for not binding ``spec``, found by trying it (libmilter keeps it)."""
    address = socket_address(spec)
    if isinstance(address, str) and os.path.lexists(address) and not stat.S_ISSOCK(os.lstat(address).st_mode):
        return f"{address} exists and is not a socket"
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if spec.startswith("inet6:") \
        else socket.AF_INET  # fmt: skip
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    if isinstance(address, str):
        Path(address).unlink(missing_ok=True)
    return "libmilter could not open it (the same bind works now)"


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
